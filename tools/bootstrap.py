"""Paired bootstrap over validation images: how sure is a difference in mAP between two groups of runs?

Each group is a list of runs (seeds) scored on the same validation images. A resample draws N image
indices with replacement; every run of both groups is scored on those same images (paired), each group's
seeds are averaged, and the difference is recorded. The 2.5th and 97.5th percentiles of the differences
make the 95% interval; the share of resamples above 0 says how often the group came out ahead. Seeds vary
the training, resamples vary the test images: the interval covers the second, the seed spread (reported
beside it) the first.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tools.metrics import mean_average_precision


@dataclass(frozen=True)
class BootstrapResult:
    delta: float  # group minus baseline on the full set, each group's seeds averaged (mAP points)
    low: float  # 95% interval of the resampled differences
    high: float
    share_above_zero: float  # fraction of resamples where the group's mAP exceeds the baseline's
    resamples: int


def run_maps(scores: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One run's reference mAP (percent) on each resample of `indices` (R, N): (R,)."""
    return np.array([mean_average_precision(scores[rows], labels[rows])[0] for rows in indices])


def resample_indices(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, num_images) image indices drawn with replacement; the same for every pair compared."""
    return np.random.default_rng(seed).integers(0, num_images, size=(resamples, num_images))


def paired_bootstrap(group_full: Sequence[float], group_resampled: Sequence[np.ndarray],
                     baseline_full: Sequence[float], baseline_resampled: Sequence[np.ndarray]) -> BootstrapResult:
    """ΔmAP (group − baseline) with its 95% paired-bootstrap interval.

    *_full: each run's mAP on all images; *_resampled: each run's run_maps on the same resamples.
    """
    if not group_resampled or not baseline_resampled:
        raise ValueError("both groups need at least one run with scores")
    deltas = np.mean(group_resampled, axis=0) - np.mean(baseline_resampled, axis=0)
    low, high = np.percentile(deltas, [2.5, 97.5])
    return BootstrapResult(float(np.mean(group_full) - np.mean(baseline_full)), float(low), float(high),
                           float(np.mean(deltas > 0)), len(deltas))
