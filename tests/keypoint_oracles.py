"""Per-map keypoint rules written literally from docs/method.md section 3, over numpy and skimage.

One map at a time, Python loops, numpy scalars as the official scripts have them: the peaks of
``peak_local_max`` are int64, the map's values float32; peaks are ranked with
``np.argsort(-values)``. These are the test oracles for core.keypoints' batched cut rules.
"""
from __future__ import annotations

import warnings

import numpy as np
from skimage.feature import peak_local_max


def find_peaks(cam: np.ndarray, min_distance: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skimage warns for min_distance=0
        return peak_local_max(cam, min_distance=min_distance)


def centre_of(cam: np.ndarray) -> list[int]:
    return [cam.shape[0] // 2, cam.shape[1] // 2]


def argmax_reference(cam: np.ndarray) -> list[int]:
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    if y == 0 or x == 0:
        return centre_of(cam)
    return [int(y), int(x)]


def argmax_clean(cam: np.ndarray) -> list[int]:
    if cam.max() <= 0:
        return centre_of(cam)
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    return [min(max(int(y), 1), cam.shape[0] - 1), min(max(int(x), 1), cam.shape[1] - 1)]


def rule_a_reference(cam: np.ndarray, k: int, min_distance: int, radius: int = 128,
                     slip: bool = True) -> list[int]:
    """cTopk. `slip=False` gives the rule the reference meant (px - ax in both branches)."""
    peaks = find_peaks(cam, min_distance)
    if len(peaks) == 0:
        return centre_of(cam)
    values = np.array([cam[p[0], p[1]] for p in peaks])
    order = np.argsort(-values)
    ay, ax = np.unravel_index(np.argmax(cam), cam.shape)
    sum_y, sum_x, count = 0, 0, 0
    if len(peaks) <= k:
        for i in range(len(peaks)):
            py, px = peaks[order[i]]
            if (py - ay) ** 2 + (px - ax) ** 2 < radius**2:
                sum_y, sum_x, count = sum_y + py, sum_x + px, count + 1
    else:
        for i in range(k):
            py, px = peaks[order[i]]
            x_term = py if slip else px
            if (py - ay) ** 2 + (x_term - ax) ** 2 < radius**2:
                sum_y, sum_x, count = sum_y + py, sum_x + px, count + 1
    if count == 0:
        return centre_of(cam)
    y, x = sum_y // count, sum_x // count
    if y == 0 or x == 0:
        return centre_of(cam)
    return [int(y), int(x)]


def rule_b_reference(cam: np.ndarray, k: int, min_distance: int, truncate_terms: bool = True) -> list[int]:
    """cTopk-w. `truncate_terms=False` truncates the sums instead (to show that the order matters)."""
    peaks = find_peaks(cam, min_distance)
    if len(peaks) == 0:
        return centre_of(cam)
    values = [cam[p[0], p[1]] for p in peaks]  # np.float32 scalars, in skimage's order
    order = np.argsort(-np.array(values))
    total = 0
    if len(peaks) <= k:
        chosen = list(order)
        for value in values:  # this branch sums in skimage's order
            total += value
    else:
        chosen = list(order[:k])
        for i in chosen:
            total += values[i]
    assert type(total) is np.float32  # python 0 + np.float32 stays float32 (numpy 2)
    y, x = 0, 0
    for i in chosen:
        term_y = peaks[i][0] * values[i] / total
        term_x = peaks[i][1] * values[i] / total
        assert type(term_y) is np.float64  # int64 * float32 -> float64
        if truncate_terms:
            y, x = y + int(term_y), x + int(term_x)
        else:
            y, x = y + term_y, x + term_x
    y, x = int(y), int(x)
    if y == 0 or x == 0:
        return centre_of(cam)
    return [y, x]


def _clamp_into(cam: np.ndarray, y: int, x: int) -> list[int]:
    return [min(max(y, 1), cam.shape[0] - 1), min(max(x, 1), cam.shape[1] - 1)]


def rule_a_clean(cam: np.ndarray, k: int, min_distance: int) -> list[int]:
    peaks = find_peaks(cam, min_distance)[:k]  # skimage already ranks them, highest first
    if len(peaks) == 0:
        return centre_of(cam)
    mean = peaks.astype(np.float64).mean(axis=0)
    return _clamp_into(cam, int(np.floor(mean[0])), int(np.floor(mean[1])))


def rule_b_clean(cam: np.ndarray, k: int, min_distance: int) -> list[int]:
    peaks = find_peaks(cam, min_distance)[:k]
    if len(peaks) == 0:
        return centre_of(cam)
    weights = np.array([cam[p[0], p[1]] for p in peaks], dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    mean = (weights[:, None] * peaks).sum(axis=0) / weights.sum()
    return _clamp_into(cam, int(np.floor(mean[0])), int(np.floor(mean[1])))


# ----------------------------------------------------------------------------- the reference's own calls
def cv2_upsample(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """The reference's upsampling of an h x w CAM to the input: cv2.resize, bilinear (dsize is (width, height))."""
    import cv2  # only these oracles need OpenCV's resize

    return cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)


def reference_task_keypoints(strategy: str, cams: np.ndarray, labels: np.ndarray, size: tuple[int, int], k: int,
                             min_distance: int, radius: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Every task's keypoint as the official scripts compute it (docs/method.md section 3), one call at a time.

    cams (B, C, h, w) float32, labels (B, C) 0/1. Max: one task per image, the CAMs merged (max over
    the positive classes) on the h x w grid and upsampled once; the channel-wise strategies: one task
    per (image, positive class) in raster order, each class's CAM upsampled on its own. Upsampling is
    cv2.resize INTER_LINEAR and the peaks are skimage's peak_local_max, as in the scripts. Returns the
    keypoints and the upsampled maps they were found on.
    """
    rules = {
        "max": argmax_reference,
        "cmax": argmax_reference,
        "ctopk": lambda cam: rule_a_reference(cam, k, min_distance, radius),
        "ctopk_w": lambda cam: rule_b_reference(cam, k, min_distance),
    }
    height, width = size
    keypoints, maps = [], []
    for b in range(cams.shape[0]):
        positives = np.flatnonzero(labels[b])
        if strategy == "max":
            per_task = [(cams[b] * labels[b][:, None, None]).max(axis=0)]
        else:
            per_task = [cams[b, c] for c in positives]
        for cam in per_task:
            up = cv2_upsample(np.ascontiguousarray(cam, dtype=np.float32), height, width)
            keypoints.append(rules[strategy](up))
            maps.append(up)
    return keypoints, maps
