"""Draw a run's CAMs with the keypoint every OASS strategy would pick, and the tiles of its puzzle split.

One PNG per image. Top row: the network input (un-normalised; the zero padding shows as the ImageNet
mean grey), then per positive class (ground truth when known, else sigmoid > 0.5, at least the
top-1) its CAM upsampled to the input, with the marker of every registered strategy that has one (the
Puzzle-CAM centre and every keypoint strategy, plug-ins included; a plug-in whose keypoint function fails
is left out with one warning) and the cTopk peaks. Bottom row:
the four tiles that the run's strategy (cTopk-w for runs without a keypoint strategy) cuts for the
first class.

    python visualize_cams.py --tag T [--checkpoint best|last|PATH] [--split val --num 8 | --images a.jpg b.jpg]
        [--out DIR] [--k 5 --min_distance 20]

Split images follow the evaluation protocol exactly (top-left window, zero-padded); --images
files are first resized so their long side is the run's image_size (as infer.py does).
"""
from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from core.config import OneLineParser
from core.inspection import cam_overlay, denormalize, load_run, predict_with_cams
from core.keypoints import top_k_peaks
from core.puzzle import split_at_keypoints
from core.runtime import choose_device
from core.strategies import STRATEGIES, KeypointError, build_tasks
from tools.errors import UserError, run_cli
from tools.images import load_rgb_image
from tools.run_files import safe_name
from tools.run_inputs import (
    add_run_args,
    eval_input,
    make_folder,
    open_image,
    open_run_split,
    run_class_names,
    save_png,
)
from tools.voc import VOC_CLASSES


def _markers() -> dict[str, tuple[str, int, tuple[int, int, int]]]:
    """strategy -> (legend label, cv2 marker, RGB colour), from the registry, drawn in this order."""
    return {name: (s.marker.label, getattr(cv2, f"MARKER_{s.marker.shape.upper()}"), s.marker.colour)
            for name, s in STRATEGIES.items() if s.marker is not None}


MARKERS = _markers()
PEAK_COLOUR = (255, 255, 0)
TILE_NAMES = ("TL", "TR", "BL", "BR")
# the ones that cut somewhere else than the centre
SPLIT_STRATEGIES = tuple(name for name, s in STRATEGIES.items() if s.cuts_at_keypoint)
MIN_PANEL = 256  # small inputs are enlarged (nearest) to at least this many pixels for legible markers
TITLE_H, LEGEND_H = 22, 26
FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.42


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p)
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the run's own; the demo set for --demo)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--split", default=None, help="split to draw from (default: the run's --val_split)")
    source.add_argument("--images", nargs="+", default=None, help="image files instead of a split (labels predicted)")
    p.add_argument("--num", type=int, default=8, help="the first NUM images of the split")
    p.add_argument("--out", default=None, help="folder of the PNGs (default: OUTPUT_DIR/figures/<tag>)")
    p.add_argument("--k", type=int, default=None, help="peaks per class for cTopk(-w) (default: the run's)")
    p.add_argument("--min_distance", type=int, default=None, help="peak suppression radius (default: the run's)")
    return p


# ----------------------------------------------------------------------------- inputs
@dataclass
class Sample:
    name: str  # file stem of the PNG
    image: torch.Tensor  # (3, S, S) network input
    labels: np.ndarray | None  # (C,) ground truth, None when unknown


def split_samples(config: dict, args: argparse.Namespace) -> list[Sample]:
    """The first --num images of the split, with their labels when the split has annotations."""
    split = open_run_split(config, args.data_dir, args.split, require_annotations=False)
    labelled = split.labels.any()  # a VOC split without annotations (test) has all-zero labels
    samples = []
    for index, (name, path) in enumerate(zip(split.names[: args.num], split.image_paths)):
        image = load_rgb_image(path)
        labels = split.labels[index] if labelled else None
        fit = config.get("eval_resize") == "fit"  # as the run's validation saw it
        samples.append(Sample(safe_name(Path(name).stem), eval_input(image, config["image_size"], fit), labels))
    return samples


def file_samples(paths: list[str], image_size: int) -> list[Sample]:
    """User images (all checked before any drawing), long side fitted to the input size."""
    images = [open_image(path) for path in paths]
    return [Sample(safe_name(Path(path).stem), eval_input(image, image_size, fit=True), None)
            for path, image in zip(paths, images)]


def positive_classes(labels: np.ndarray | None, probs: torch.Tensor) -> tuple[list[int], str]:
    """Ground-truth classes when known (and non-empty), else sigmoid > 0.5, at least the top-1."""
    if labels is not None and labels.any():
        return [int(c) for c in np.flatnonzero(labels)], "GT"
    predicted = [int(c) for c in torch.nonzero(probs > 0.5).flatten()]
    return predicted or [int(probs.argmax())], "pred"


# ----------------------------------------------------------------------------- the method's keypoints
def image_labels(classes: list[int], num_classes: int) -> torch.Tensor:
    """(1, C) labels of one image holding `classes`, as build_tasks takes them."""
    labels = torch.zeros(1, num_classes)
    labels[0, classes] = 1.0
    return labels


def strategy_keypoints(cams: torch.Tensor, classes: list[int], size: int, k: int, min_distance: int,
                       keypoint_rule: str = "reference", skipped: set[str] | None = None) -> dict[str, torch.Tensor]:
    """(len(classes), 2) long (y, x) cut per strategy, from the shared build_tasks.

    `classes` ascending: the channel-wise strategies make their tasks in that order; Max and the
    centre make one task per image, shared by all its classes. A plug-in whose keypoint function fails
    is left out with one warning, and added to `skipped` (the strategies left out of every figure).
    """
    labels = image_labels(classes, cams.shape[0])
    skipped = set() if skipped is None else skipped
    points = {}
    for name in MARKERS:
        strategy = STRATEGIES[name]
        if name in skipped:
            continue
        try:
            tasks = build_tasks(strategy, cams[None], labels, labels, (size, size), k, min_distance, keypoint_rule)
            tasks.check_inside(strategy)
        except KeypointError as exc:
            if not strategy.plugin:
                raise
            warnings.warn(f"{exc}; its marker is left out", stacklevel=2)  # the other markers stand
            skipped.add(name)
            continue
        points[name] = tasks.keypoints if strategy.per_class else tasks.keypoints[:1].expand(len(classes), 2)
    return points


def split_strategy(config: dict) -> str:
    strategy = config.get("strategy", "none")
    return strategy if strategy in SPLIT_STRATEGIES else "ctopk_w"


def first_class_tiles(image: torch.Tensor, cams: torch.Tensor, classes: list[int], strategy: str, k: int,
                      min_distance: int, keypoint_rule: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """The strategy's cut (y, x) for the first class and its four tiles (4, 3, S/2, S/2)."""
    size = image.shape[-1]
    labels = image_labels(classes, cams.shape[0])
    tasks = build_tasks(STRATEGIES[strategy], cams[None], labels, labels, (size, size), k, min_distance,
                        keypoint_rule)
    tasks.check_inside(STRATEGIES[strategy])
    cuts = tasks.keypoints[:1]
    return cuts[0], split_at_keypoints(image[None], tasks.image_index[:1], cuts)


# ----------------------------------------------------------------------------- drawing
def display_scale(image_size: int) -> int:
    return max(1, -(-MIN_PANEL // image_size))


def figure_shape(num_classes: int, image_size: int) -> tuple[int, int]:
    """(height, width) of the PNG for an image with `num_classes` drawn classes."""
    panel = image_size * display_scale(image_size)
    return TITLE_H + panel + TITLE_H + panel // 2 + LEGEND_H, max(1 + num_classes, 2) * panel


def enlarge(rgb: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def put_text(canvas: np.ndarray, text: str, x: int, y: int, colour=(0, 0, 0)) -> None:
    cv2.putText(canvas, text, (x, y), FONT, FONT_SCALE, colour, 1, cv2.LINE_AA)


def to_display(point: torch.Tensor, scale: int) -> tuple[int, int]:
    """(y, x) input pixel -> (x, y) display position of its centre."""
    y, x = (float(v) for v in point)
    return int(x * scale + scale / 2), int(y * scale + scale / 2)


def draw_marker(canvas: np.ndarray, at: tuple[int, int], strategy: str) -> None:
    _, marker, colour = MARKERS[strategy]
    cv2.drawMarker(canvas, at, (0, 0, 0), marker, 16, 4, cv2.LINE_AA)  # dark outline: visible on any JET colour
    cv2.drawMarker(canvas, at, colour, marker, 16, 2, cv2.LINE_AA)


def class_panel(rgb: np.ndarray, cam: torch.Tensor, points: dict[str, torch.Tensor], peaks: torch.Tensor,
                scale: int) -> np.ndarray:
    panel = enlarge(cam_overlay(rgb, cam), scale)
    for point in peaks:
        cv2.circle(panel, to_display(point, scale), 3, PEAK_COLOUR, -1, cv2.LINE_AA)
    for strategy, point in points.items():
        draw_marker(panel, to_display(point, scale), strategy)
    return panel


def draw_legend(canvas: np.ndarray, top: int) -> None:
    x, y = 10, top + LEGEND_H // 2
    cv2.circle(canvas, (x, y), 3, PEAK_COLOUR, -1, cv2.LINE_AA)
    put_text(canvas, "peaks", x + 8, y + 5)
    x += 60
    for strategy, (label, _, _) in MARKERS.items():
        draw_marker(canvas, (x, y), strategy)
        put_text(canvas, label, x + 12, y + 5)
        x += 24 + cv2.getTextSize(label, FONT, FONT_SCALE, 1)[0][0]


@dataclass
class Figure:
    rgb: np.ndarray  # (S, S, 3) the input, un-normalised
    class_names: list[str]  # panel titles
    cams: list[torch.Tensor]  # (S, S) per drawn class
    points: list[dict[str, torch.Tensor]]  # per drawn class: strategy -> (y, x)
    peaks: list[torch.Tensor]  # per drawn class: (n, 2) the cTopk peaks
    cut: torch.Tensor  # (y, x) of the tile split
    tiles: np.ndarray  # (4, S/2, S/2, 3)
    tiles_title: str
    image_title: str


def compose(fig: Figure) -> np.ndarray:
    """The figure as one uint8 RGB image of figure_shape(...)."""
    size = fig.rgb.shape[0]
    scale = display_scale(size)
    panel = size * scale
    height, width = figure_shape(len(fig.cams), size)
    canvas = np.full((height, width, 3), 255, np.uint8)
    image = enlarge(fig.rgb, scale)
    cut_x, cut_y = int(fig.cut[1]) * scale, int(fig.cut[0]) * scale
    cv2.line(image, (cut_x, 0), (cut_x, panel - 1), (255, 255, 255), 1)  # the tile split of the bottom row
    cv2.line(image, (0, cut_y), (panel - 1, cut_y), (255, 255, 255), 1)
    canvas[TITLE_H:TITLE_H + panel, :panel] = image
    put_text(canvas, fig.image_title, 4, TITLE_H - 7)
    for i, (title, cam, points, peaks) in enumerate(zip(fig.class_names, fig.cams, fig.points, fig.peaks), 1):
        canvas[TITLE_H:TITLE_H + panel, i * panel:(i + 1) * panel] = class_panel(fig.rgb, cam, points, peaks, scale)
        put_text(canvas, title, i * panel + 4, TITLE_H - 7)
    top = 2 * TITLE_H + panel
    put_text(canvas, fig.tiles_title, 4, top - 7)
    half = panel // 2
    for q, tile in enumerate(fig.tiles):
        canvas[top:top + half, q * half:(q + 1) * half] = enlarge(tile, scale)
        cv2.rectangle(canvas, (q * half, top), ((q + 1) * half - 1, top + half - 1), (255, 255, 255), 1)
        put_text(canvas, TILE_NAMES[q], q * half + 4, top + 14, (255, 255, 255))
    draw_legend(canvas, top + half)
    return canvas


def build_figure(sample: Sample, model: torch.nn.Module, device: torch.device, strategy: str, k: int,
                 min_distance: int, keypoint_rule: str = "reference",
                 class_names: tuple[str, ...] = VOC_CLASSES, skipped: set[str] | None = None) -> Figure:
    logits, cams, upsampled = predict_with_cams(model, sample.image, device)
    probs = torch.sigmoid(logits)
    classes, source = positive_classes(sample.labels, probs)
    size = sample.image.shape[-1]
    points = strategy_keypoints(cams, classes, size, k, min_distance, keypoint_rule, skipped)
    peak_coords, _, valid = top_k_peaks(upsampled[classes], k, min_distance)
    cut, tiles = first_class_tiles(sample.image, cams, classes, strategy, k, min_distance, keypoint_rule)
    label, _, _ = MARKERS[strategy]
    target = class_names[classes[0]] if STRATEGIES[strategy].per_class else "the image (merged CAM)"
    return Figure(
        rgb=denormalize(sample.image), cams=[upsampled[c] for c in classes],
        class_names=[f"{class_names[c]} ({source}) p={float(probs[c]):.2f}" for c in classes],
        points=[{name: kp[i] for name, kp in points.items()} for i in range(len(classes))],
        peaks=[peak_coords[i][valid[i]] for i in range(len(classes))],
        cut=cut, tiles=denormalize(tiles), image_title=f"{sample.name} ({size}x{size} input)",
        tiles_title=f"{label} tiles for {target}, cut at y={int(cut[0])} x={int(cut[1])}",
    )


def visualize(args: argparse.Namespace) -> list[Path]:
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    device = choose_device(args.device)
    run = load_run(args.tag, args.checkpoint, args.output_dir, device)
    config = run.config
    k = config.get("k", 5) if args.k is None else args.k
    min_distance = config.get("min_distance", 20) if args.min_distance is None else args.min_distance
    if k < 1 or min_distance < 0:
        raise UserError("--k must be at least 1 and --min_distance not negative")
    samples = file_samples(args.images, config["image_size"]) if args.images else split_samples(config, args)
    out = make_folder(args.out or Path(args.output_dir) / "figures" / run.tag)
    strategy = split_strategy(config)
    written, used, skipped = [], set(), set()
    for sample in samples:
        name = sample.name if sample.name not in used else f"{sample.name}_{len(written)}"
        used.add(name)
        figure = build_figure(sample, run.model, device, strategy, k, min_distance,
                              config.get("keypoint_rule", "reference"), run_class_names(config), skipped)
        written.append(save_png(out / f"{name}.png", compose(figure)))
    print(f"wrote {len(written)} figure(s) of {run.tag} ({run.path.name}) to {out}")
    return written


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: visualize(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
