"""CAM quality metrics: segmentation mIoU of thresholded CAMs, VOC palette masks, and box hits.

* **mIoU** (the weakly-supervised segmentation protocol of Puzzle-CAM and its predecessors): a
  pixel takes the class of its highest CAM among the image's positive classes, or background (0)
  when that CAM is not above the background threshold; ties go to background and then to the
  lower class index (an argmax over [threshold, CAM_1, ..., CAM_K]). Ground-truth pixels equal
  to 255 are ignored. IoU = TP / (TP + FP + FN) per class over the whole split; classes that
  appear neither in the ground truth nor in the prediction are left out of the mean.
* **Pointing game / keypoint hit rate**: a point (y, x) in 0-based pixels is a hit when it lies
  in a box of its class; boxes are VOC's (xmin, ymin, xmax, ymax), 1-based and inclusive. The
  distance to a box is the Euclidean pixel distance to its nearest pixel (0 inside).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from tools.voc import CLASS_INDEX

__all__ = [
    "IGNORE_LABEL",
    "NUM_SEG_CLASSES",
    "HitTally",
    "argmax_points",
    "box_array",
    "box_distances",
    "confusion_matrix",
    "foreground",
    "iou_per_class",
    "label_mask",
    "mean_iou",
    "palette_image",
    "score_points",
    "threshold_confusions",
    "voc_colormap",
]

NUM_SEG_CLASSES = 21  # background + the 20 VOC classes
IGNORE_LABEL = 255


# ----------------------------------------------------------------------------- masks and palette
def voc_colormap(count: int = 256) -> np.ndarray:
    """(count, 3) uint8 VOC colour map: the bits of the label spread over R, G, B from the top bit down."""
    labels = np.arange(count)
    colours = np.zeros((count, 3), np.uint8)
    for shift in range(8):
        for channel in range(3):
            bit = (labels >> (3 * shift + channel)) & 1
            colours[:, channel] |= (bit << (7 - shift)).astype(np.uint8)
    return colours


def palette_image(mask: np.ndarray) -> Image.Image:
    """A uint8 label mask (H, W) as a mode-"P" image with the VOC colour map (the SegmentationClass format)."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} {mask.shape}")
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask).tobytes())
    image.putpalette(voc_colormap().flatten().tolist())
    return image


def foreground(cams: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(best CAM value, its segmentation label 1..20) per pixel of (K, H, W) CAMs of `classes` (0-based).

    Ties go to the first channel; with no class at all the value is -inf (every threshold gives background).
    """
    cams = np.asarray(cams, dtype=np.float32)
    if cams.shape[0] == 0:
        return np.full(cams.shape[1:], -np.inf, np.float32), np.zeros(cams.shape[1:], np.uint8)
    best = cams.argmax(axis=0)
    labels = (np.asarray(classes, np.int64) + 1)[best].astype(np.uint8)
    return np.take_along_axis(cams, best[None], axis=0)[0], labels


def label_mask(cams: np.ndarray, classes: Sequence[int], threshold: float) -> np.ndarray:
    """uint8 (H, W) segmentation labels of CAMs at a background threshold (see the module docstring).

    The comparison is made in float32, the CAMs' type, like the reference's argmax over the CAMs
    padded with the threshold: a CAM equal to float32(threshold) is background.
    """
    value, labels = foreground(cams, classes)
    return np.where(value > np.float32(threshold), labels, 0).astype(np.uint8)


# ----------------------------------------------------------------------------- confusion and IoU
def _valid_truth(truth: np.ndarray, num_classes: int) -> np.ndarray:
    truth = np.asarray(truth)
    bad = (truth != IGNORE_LABEL) & ((truth < 0) | (truth >= num_classes))
    if bad.any():
        raise ValueError(f"ground truth holds label {int(truth[bad][0])}, outside 0..{num_classes - 1} and "
                         f"{IGNORE_LABEL}")
    return truth != IGNORE_LABEL


def confusion_matrix(prediction: np.ndarray, truth: np.ndarray, num_classes: int = NUM_SEG_CLASSES) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction; 255 ignored."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} differ in size")
    valid = _valid_truth(truth, num_classes)
    index = truth[valid].astype(np.int64) * num_classes + prediction[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def threshold_confusions(value: np.ndarray, labels: np.ndarray, truth: np.ndarray, thresholds: Sequence[float],
                         num_classes: int = NUM_SEG_CLASSES) -> np.ndarray:
    """(T, num_classes, num_classes) confusion matrices of `foreground`'s output at each threshold, in one pass.

    A pixel is foreground at threshold t when value > t, so with ascending thresholds it is foreground
    for exactly the first `level` of them, level = #{t < value}. One histogram over (truth, label,
    level) then gives every threshold's matrix by cumulative sums over the levels.
    """
    ts = np.asarray(thresholds, dtype=np.float32)  # compared in float32, as label_mask does
    if ts.ndim != 1 or np.any(np.diff(ts) <= 0):
        raise ValueError("thresholds must be strictly increasing (in float32)")
    if value.shape != truth.shape:
        raise ValueError(f"CAMs {value.shape} and ground truth {truth.shape} differ in size")
    valid = _valid_truth(truth, num_classes)
    level = np.searchsorted(ts, value[valid].astype(np.float32), side="left")  # number of thresholds < value
    levels = len(ts) + 1
    index = (truth[valid].astype(np.int64) * num_classes + labels[valid].astype(np.int64)) * levels + level
    hist = np.bincount(index, minlength=num_classes ** 2 * levels).reshape(num_classes, num_classes, levels)
    above = np.flip(np.cumsum(np.flip(hist, axis=2), axis=2), axis=2)  # above[..., j] = sum of levels >= j
    out = np.empty((len(ts), num_classes, num_classes), np.int64)
    for j in range(len(ts)):
        out[j] = above[:, :, j + 1]  # foreground at threshold j: level > j
        out[j, :, 0] += hist[:, :, : j + 1].sum(axis=(1, 2))  # the others are background
    return out


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the per-class IoUs over the classes present in the truth or the prediction (NaN when none)."""
    ious = iou_per_class(confusion)
    return float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")


# ----------------------------------------------------------------------------- boxes and points
def box_array(objects: Iterable) -> np.ndarray:
    """(M, 5) int64 rows (class index, xmin, ymin, xmax, ymax) of VOC objects (`.name`, `.box`); difficult included."""
    rows = [(CLASS_INDEX[o.name], *o.box) for o in objects]
    return np.asarray(rows, np.int64).reshape(-1, 5)


def box_distances(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N, M) pixel distance from (y, x) points (0-based) to (xmin, ymin, xmax, ymax) boxes (1-based inclusive)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) - 1.0  # to 0-based inclusive pixel indices
    y, x = points[:, 0:1], points[:, 1:2]
    dx = np.maximum(np.maximum(boxes[None, :, 0] - x, x - boxes[None, :, 2]), 0.0)
    dy = np.maximum(np.maximum(boxes[None, :, 1] - y, y - boxes[None, :, 3]), 0.0)
    return np.hypot(dx, dy)


def score_points(points: np.ndarray, candidates: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per point: hit (inside one of its candidate boxes) and the distance to the nearest one.

    `candidates[i]` holds point i's boxes (m_i, 4); a point with no candidate box is a miss at
    distance inf.
    """
    points = np.asarray(points, np.float64).reshape(-1, 2)
    distances = np.array([box_distances(p, boxes).min() if len(boxes) else np.inf
                          for p, boxes in zip(points, candidates)], np.float64).reshape(-1)
    return distances == 0.0, distances


def argmax_points(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) long (y, x) of each (H, W) map's maximum (first in raster order) and whether it is above 0.

    An all-zero CAM points nowhere: its `valid` is False and the pointing game counts it as a miss.
    """
    flat = maps.flatten(1)
    best, index = flat.max(dim=1)
    width = maps.shape[-1]
    return torch.stack((index // width, index % width), dim=1), best > 0


@dataclass
class HitTally:
    """Hits (and distances) of scored points, per metric name, mergeable over batches and processes."""

    hits: dict[str, list[np.ndarray]] = field(default_factory=dict)
    distances: dict[str, list[np.ndarray]] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # name -> why it is no longer scored (left out)

    def add(self, name: str, hits: np.ndarray, distances: np.ndarray | None = None) -> None:
        if name in self.dropped:
            return
        self.hits.setdefault(name, []).append(np.asarray(hits, bool).reshape(-1))
        if distances is not None:
            self.distances.setdefault(name, []).append(np.asarray(distances, np.float64).reshape(-1))

    def drop(self, name: str, reason: str) -> None:
        """Stop scoring `name` and forget its points so far: a partial tally would be a rate over other points."""
        self.hits.pop(name, None)
        self.distances.pop(name, None)
        self.dropped.setdefault(name, reason)

    def merge(self, other: HitTally) -> None:
        for name, reason in other.dropped.items():
            self.drop(name, reason)
        for name, parts in other.hits.items():
            if name not in self.dropped:
                self.hits.setdefault(name, []).extend(parts)
        for name, parts in other.distances.items():
            if name not in self.dropped:
                self.distances.setdefault(name, []).extend(parts)

    def summary(self) -> dict[str, dict[str, float]]:
        """name -> {hit_rate (percent), distance (mean px over the points with a box), count}."""
        out = {}
        for name, parts in self.hits.items():
            hits = np.concatenate(parts) if parts else np.zeros(0, bool)
            row = {"hit_rate": 100.0 * float(hits.mean()) if len(hits) else float("nan"), "count": int(len(hits))}
            if name in self.distances:
                distances = np.concatenate(self.distances[name])
                finite = distances[np.isfinite(distances)]
                row["distance"] = float(finite.mean()) if len(finite) else float("nan")
            out[name] = row
        return out
