"""Keypoint strategies: from the student's CAMs and the labels to the batch's puzzle tasks.

A task is (image, keypoint, target). Image-level strategies make one task per image with all its
labels as target; channel-wise ones (the Class-Specific Instances) make one task per
(image, positive class) with a one-hot target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.keypoints import argmax_cuts, topk_mean_cuts, topk_weighted_cuts, upsample_maps


@dataclass(frozen=True)
class Strategy:
    name: str
    summary: str
    puzzle: bool  # whether there is an auxiliary task at all
    per_class: bool  # one task per (image, positive class) with a one-hot target
    keypoints: str  # centre | argmax | peaks | weighted_peaks
    patch_network: str  # default network for the tiles: student | teacher
    # How the tiles meet the patch network (--tile_calls): "batch" = all tiles of a batch in one call,
    # ordered by quadrant (Puzzle-CAM); "task" = one call of 4 tiles per task (the OASS scripts). It
    # decides the BatchNorm grouping of the tiles (core/batchnorm.py).
    tile_calls: str = "task"


STRATEGIES = {
    s.name: s
    for s in (
        Strategy("none", "plain classification (class loss only)", False, False, "centre", "student"),
        Strategy("puzzle", "Puzzle-CAM: centre cut, student tiles, all labels", True, False, "centre", "student",
                 tile_calls="batch"),
        Strategy("max", "argmax of the merged CAM, student tiles, all labels", True, False, "argmax", "student"),
        Strategy("cmax", "argmax of each class's CAM, EMA-teacher tiles, one-hot", True, True, "argmax", "teacher"),
        Strategy("ctopk", "mean of each class's top-k CAM peaks, EMA teacher, one-hot", True, True, "peaks", "teacher"),
        Strategy("ctopk_w", "CAM-weighted mean of the top-k peaks, EMA teacher, one-hot", True, True,
                 "weighted_peaks", "teacher"),
    )
}


@dataclass
class Tasks:
    image_index: torch.Tensor  # (N,) long: the image each task cuts
    keypoints: torch.Tensor  # (N, 2) long (y, x) cut positions in input pixels, each in [1, size - 1]
    targets: torch.Tensor  # (N, C) float

    def __len__(self) -> int:
        return int(self.image_index.shape[0])


def task_pairs(labels_cpu: torch.Tensor, per_class: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image index, class index or None) of every task; computed on the CPU labels to avoid a device sync."""
    if per_class:
        image_index, class_index = labels_cpu.nonzero(as_tuple=True)
        return image_index, class_index
    return torch.arange(labels_cpu.shape[0]), None


def build_tasks(strategy: Strategy, cams: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
                image_size: tuple[int, int], k: int = 5, min_distance: int = 20,
                keypoint_rule: str = "reference", radius: int = 128) -> Tasks:
    """Tasks of a batch from its (detached) CAMs (B, C, h, w) and labels (B, C) on the CAMs' device.

    The keypoints are the cut positions themselves (core.keypoints' rules, `keypoint_rule`
    reference or clean); nothing is clamped afterwards.
    """
    device = cams.device
    image_index, class_index = task_pairs(labels_cpu, strategy.per_class)
    image_index = image_index.to(device, non_blocking=True)
    if class_index is not None:
        class_index = class_index.to(device, non_blocking=True)
        targets = F.one_hot(class_index, labels.shape[1]).to(labels.dtype)
    else:
        targets = labels
    height, width = image_size
    if strategy.keypoints == "centre":
        centre = torch.empty((len(image_index), 2), dtype=torch.long, device=device)
        centre[:, 0], centre[:, 1] = height // 2, width // 2  # filled on the device: no copy, no sync
        return Tasks(image_index, centre, targets)
    if class_index is not None:  # cMax / cTopk / cTopk-w: each positive class's map upsampled on its own
        maps = cams[image_index, class_index]
    else:  # Max: merge on the h x w grid (max over the positive classes), then one upsample
        maps = (cams * labels[:, :, None, None]).amax(dim=1)
    maps = upsample_maps(maps.float(), (height, width))
    if strategy.keypoints == "argmax":
        keypoints = argmax_cuts(maps, keypoint_rule)
    elif strategy.keypoints == "peaks":
        keypoints = topk_mean_cuts(maps, k, min_distance, keypoint_rule, radius)
    else:
        keypoints = topk_weighted_cuts(maps, k, min_distance, keypoint_rule)
    return Tasks(image_index, keypoints, targets)
