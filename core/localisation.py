"""Is the CAM on the object? The pointing game and every OASS strategy's keypoint, scored against the boxes.

Shared by the validation of the training loop (on the CAMs of its forward pass, at the input size) and
by evaluate_cams.py (on the multi-scale CAMs that make_cams.py saves, at the image size). The metrics
themselves are tools/cam_metrics.py's.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from core.keypoints import upsample_maps
from core.plugins import load_plugins
from core.strategies import STRATEGIES, KeypointError, build_tasks, task_pairs
from tools.cam_metrics import HitTally, argmax_points, score_points

POINTING_GAME = "pointing_game"


def keypoint_strategies() -> tuple[str, ...]:
    """The registered strategies that cut at a CAM keypoint, in registration order (plug-ins last)."""
    return tuple(name for name, strategy in STRATEGIES.items() if strategy.cuts_at_keypoint)


def display_names() -> dict[str, str]:
    """Row names of the pointing game and of every keypoint strategy, for logs and tables."""
    return {POINTING_GAME: "pointing game", **{name: STRATEGIES[name].title for name in keypoint_strategies()}}


# Snapshots of the registry once the plug-ins are loaded, for callers that read them as constants (the
# plug-in test, which stays unchanged); code in this repo calls the two functions, which read it live.
load_plugins()
KEYPOINT_STRATEGIES = keypoint_strategies()
DISPLAY_NAMES = display_names()


def class_boxes(boxes: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """(m, 4) boxes of `classes` among one image's (M, 5) rows (class, xmin, ymin, xmax, ymax)."""
    return boxes[np.isin(boxes[:, 0], np.asarray(classes, np.int64)), 1:]


def pointing_hits(cams: torch.Tensor, labels_cpu: torch.Tensor, boxes: Sequence[np.ndarray],
                  image_size: tuple[int, int]) -> np.ndarray:
    """Per (image, positive class), in raster order of the labels: is the CAM's argmax in a box of its class?"""
    image_index, class_index = labels_cpu.nonzero(as_tuple=True)
    if len(image_index) == 0:
        return np.zeros(0, bool)
    device = cams.device
    maps = upsample_maps(cams[image_index.to(device), class_index.to(device)].float(), image_size)
    points, valid = argmax_points(maps)
    candidates = [class_boxes(boxes[i], [c]) for i, c in zip(image_index.tolist(), class_index.tolist())]
    hits, _ = score_points(points.cpu().numpy(), candidates)
    return hits & valid.cpu().numpy()


def keypoint_scores(strategy: str, cams: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
                    boxes: Sequence[np.ndarray], image_size: tuple[int, int], k: int, min_distance: int,
                    keypoint_rule: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """(hits, distances) of the cuts the strategy makes, with the training loop's own build_tasks and rule.

    Channel-wise strategies: one keypoint per (image, positive class), scored against that class's
    boxes. Max: one keypoint per image, scored against the boxes of all its positive classes
    (images without a positive class are left out). A cut outside [1, size - 1] raises KeypointError.
    """
    rule = STRATEGIES[strategy]
    tasks = build_tasks(rule, cams, labels, labels_cpu, image_size, k, min_distance, keypoint_rule)
    tasks.check_inside(rule)  # the keypoints go to the host below anyway
    image_index, class_index = task_pairs(labels_cpu, rule.per_class)
    points = tasks.keypoints.cpu().numpy()
    if class_index is not None:
        candidates = [class_boxes(boxes[i], [c]) for i, c in zip(image_index.tolist(), class_index.tolist())]
    else:
        keep = labels_cpu.bool().any(dim=1).numpy()
        points = points[keep]
        candidates = [class_boxes(boxes[i], labels_cpu[i].nonzero()[:, 0].tolist()) for i in np.flatnonzero(keep)]
    return score_points(points, candidates)


@torch.no_grad()
def score_localisation(tally: HitTally, cams: torch.Tensor, labels: torch.Tensor, boxes: Sequence[np.ndarray],
                       image_size: tuple[int, int], k: int, min_distance: int,
                       keypoint_rule: str = "reference") -> None:
    """Add a batch to `tally`: the pointing game and the keypoint of every strategy of keypoint_strategies().

    cams (B, C, h, w): the normalised CAMs (any resolution; upsampled to image_size like in training);
    labels (B, C) 0/1 on the CAMs' device; boxes[b] (M, 5) rows (channel, xmin, ymin, xmax, ymax) in
    pixels of image_size, VOC's 1-based inclusive convention. A plug-in strategy whose keypoint function
    fails (KeypointError) is dropped from `tally` with the reason, and skipped from then on: a broken
    plug-in must not stop the validation of every other strategy's runs.
    """
    labels_cpu = labels.detach().cpu()
    tally.add(POINTING_GAME, pointing_hits(cams, labels_cpu, boxes, image_size))
    for strategy in keypoint_strategies():
        if strategy in tally.dropped:
            continue
        try:
            scored = keypoint_scores(strategy, cams, labels, labels_cpu, boxes, image_size, k, min_distance,
                                     keypoint_rule)
        except KeypointError as exc:
            if not STRATEGIES[strategy].plugin:
                raise
            tally.drop(strategy, str(exc))
            continue
        tally.add(strategy, *scored)


def flat_summary(tally: HitTally) -> dict[str, float]:
    """{pointing_game, hit_rate_<strategy>, box_distance_<strategy>}: flat keys for histories and scalars
    (none for a strategy the tally dropped)."""
    summary = tally.summary()
    out = {POINTING_GAME: summary.get(POINTING_GAME, {}).get("hit_rate", float("nan"))}
    for strategy in keypoint_strategies():
        if strategy in tally.dropped:
            continue
        row = summary.get(strategy, {})
        out[f"hit_rate_{strategy}"] = row.get("hit_rate", float("nan"))
        out[f"box_distance_{strategy}"] = row.get("distance", float("nan"))
    return out


def format_summary(summary: dict[str, float]) -> str:
    """One log-line fragment: pointing game and per-strategy hit rate (mean distance to the box)."""
    parts = [f"pointing {summary[POINTING_GAME]:.1f}%"]
    names = display_names()
    parts += [f"{names[s]} {summary[f'hit_rate_{s}']:.1f}% ({summary[f'box_distance_{s}']:.1f}px)"
              for s in keypoint_strategies() if f"hit_rate_{s}" in summary]
    return "hits: " + " ".join(parts)
