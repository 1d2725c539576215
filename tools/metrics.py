"""Multi-label metrics: the reference's AP, the VOC devkit's AP, and the thresholded CP/CR/CF1/OP/OR/OF1.

Both rank the items of a class by descending score and differ in what they average:

* ``reference``: the precision at the rank of each positive, averaged over the
  positives (non-interpolated; equals sklearn's ``average_precision_score`` when
  no scores tie). Every item counts.
* ``voc``: the VOC2012 devkit (``VOCevalcls`` + ``VOCap``): the area under the
  precision *envelope* (precision made non-increasing from the right), which is
  the envelope averaged over the positives' ranks, so it is never below the
  reference AP. Items marked ``ignore`` (the devkit's gt == 0: images whose
  only objects of the class are ``difficult``) are left out of the ranking;
  the devkit keeps them in its sorted list but counts them as neither true
  nor false positives, which gives the same number.

Ties: both kinds sort with a *stable* descending sort, so items with equal
scores keep their input order (the order of the image list). That is what the
devkit does: ``[so, si] = sort(-out)`` with MATLAB's stable ``sort``. With ties
the result therefore depends on the input order, unlike sklearn, which treats
a tie as one threshold.

The thresholded metrics (``threshold_metrics``, ``multilabel_metrics``) follow the protocol of
ML-GCN's ``AveragePrecisionMeter.evaluation`` (megvii-research/ML-GCN, util.py), used since by
CSRA, ASL and Query2Label; see that function's docstring for the conventions.
"""
from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "AP_KINDS",
    "THRESHOLD_METRICS",
    "chance_map",
    "mean_average_precision",
    "multilabel_metrics",
    "reference_average_precision",
    "threshold_metrics",
    "voc_average_precision",
]

APKind = Literal["reference", "voc"]
AP_KINDS: tuple[str, ...] = ("reference", "voc")


# ----------------------------------------------------------------------------- checks


def _as_scores(scores: np.ndarray, ndim: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != ndim:
        raise ValueError(f"scores must be a {ndim}-D array, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN: they cannot be ranked")
    return scores


def _as_flags(name: str, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean array of `shape` from {0, 1} / bool values."""
    values = np.asarray(values)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape} like scores, got {values.shape}")
    if values.dtype != bool and not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0/1 (or booleans)")
    return values.astype(bool)


# ----------------------------------------------------------------------------- core (per column)


def _ranked(scores: np.ndarray, positive: np.ndarray, counted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: precision at every rank and the positive flags in rank order, both (n, C).

    Ranking is a stable descending sort of the scores (ties keep input order);
    items with ``counted`` False occupy a rank but count neither as a hit nor
    as seen, which is the same as leaving them out (their precision repeats the
    previous rank's, so neither the values at positives nor the envelope change).
    """
    order = np.argsort(-scores, axis=0, kind="stable")
    hits = np.take_along_axis(positive & counted, order, axis=0)
    seen = np.cumsum(np.take_along_axis(counted, order, axis=0), axis=0)
    precision = np.cumsum(hits, axis=0) / np.maximum(seen, 1)
    return precision, hits


def _mean_over_positives(values: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """(C,) mean of `values` at the positives' ranks; NaN for a column with no positive."""
    n_pos = hits.sum(axis=0)
    total = (values * hits).sum(axis=0)
    return np.divide(total, n_pos, out=np.full(total.shape, np.nan), where=n_pos > 0)


def _reference_ap_columns(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    precision, hits = _ranked(scores, targets, np.ones_like(targets))
    return _mean_over_positives(precision, hits)


def _voc_ap_columns(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray) -> np.ndarray:
    precision, hits = _ranked(scores, targets, ~ignore)
    # VOCap: mpre(i) = max(mpre(i), mpre(i+1)) from the right; recall grows by 1/npos at each
    # positive, so the area is the envelope averaged over the positives' ranks.
    envelope = np.maximum.accumulate(precision[::-1], axis=0)[::-1]
    return _mean_over_positives(envelope, hits)


# ----------------------------------------------------------------------------- public API


def reference_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """The reference's non-interpolated AP of one class: mean precision at each positive's rank.

    ``scores`` (n,), ``targets`` (n,) in {0, 1}. Stable descending ranking: tied
    scores keep their input order. NaN when there is no positive.
    """
    scores = _as_scores(scores, 1)
    targets = _as_flags("targets", targets, scores.shape)
    return float(_reference_ap_columns(scores[:, None], targets[:, None])[0])


def voc_average_precision(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None) -> float:
    """The VOC2012 devkit AP of one class: area under the precision envelope.

    ``ignore`` (n,) bool marks items left out (the devkit's "difficult only"
    images). Stable descending ranking like the devkit's MATLAB ``sort``: tied
    scores keep their input order. NaN when no counted item is positive.
    """
    scores = _as_scores(scores, 1)
    targets = _as_flags("targets", targets, scores.shape)
    ignore = np.zeros_like(targets) if ignore is None else _as_flags("ignore", ignore, scores.shape)
    return float(_voc_ap_columns(scores[:, None], targets[:, None], ignore[:, None])[0])


def mean_average_precision(
    scores: np.ndarray,
    targets: np.ndarray,
    ignore: np.ndarray | None = None,
    kind: APKind = "reference",
) -> tuple[float, np.ndarray]:
    """mAP in percent over the classes with at least one positive, and the per-class APs in [0, 1].

    ``scores``, ``targets`` (and ``ignore``) are (n, C). ``kind`` is ``"reference"``
    or ``"voc"``; ``ignore`` only exists in the VOC protocol, so passing it with
    ``kind="reference"`` is an error rather than a silently different number.
    Classes without a positive get NaN in the per-class array and are skipped by
    the mean (NaN when no class has a positive).
    """
    if kind not in AP_KINDS:
        raise ValueError(f"kind must be one of {AP_KINDS}, got {kind!r}")
    scores = _as_scores(scores, 2)
    targets = _as_flags("targets", targets, scores.shape)
    if kind == "reference":
        if ignore is not None:
            raise ValueError("ignore is only used by kind='voc'; the reference AP counts every item")
        per_class = _reference_ap_columns(scores, targets)
    else:
        ignore = np.zeros_like(targets) if ignore is None else _as_flags("ignore", ignore, scores.shape)
        per_class = _voc_ap_columns(scores, targets, ignore)
    defined = ~np.isnan(per_class)
    mean = float(100.0 * per_class[defined].mean()) if defined.any() else float("nan")
    return mean, per_class


def chance_map(targets: np.ndarray, draws: int = 100, seed: int = 0) -> float:
    """Chance level: the reference-kind mAP (percent) of uniform random scores, averaged over draws.

    Seeded (numpy ``default_rng(seed)``), so the same labels always give the
    same number. Its expectation is close to the mean class prevalence.
    """
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"targets must be a 2-D (n, C) array, got shape {targets.shape}")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be an integer >= 1, got {draws!r}")
    targets = _as_flags("targets", targets, targets.shape)
    rng = np.random.default_rng(seed)
    maps = [mean_average_precision(rng.random(targets.shape), targets)[0] for _ in range(draws)]
    return float(np.mean(maps))


# ----------------------------------------------------------------------------- thresholded metrics

THRESHOLD_METRICS: tuple[str, ...] = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def _predicted_positives(probabilities: np.ndarray, threshold: float, top_k: int | None) -> np.ndarray:
    """(n, C) bool: score >= threshold, and with top_k among the image's k highest scores.

    Ties for the k-th place go to the lower class index (stable sort), so the result never
    depends on the sorting algorithm.
    """
    passed = probabilities >= threshold
    if top_k is None:
        return passed
    best = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
    kept = np.zeros_like(passed)
    np.put_along_axis(kept, best, True, axis=1)
    return passed & kept


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def threshold_metrics(probabilities: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None,
                      threshold: float = 0.5, top_k: int | None = None) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 in percent, from (n, C) probabilities (after the sigmoid) and 0/1 targets.

    A label is predicted when its probability is >= ``threshold`` (ML-GCN: logit >= 0); with
    ``top_k`` only the image's k highest scores may be predicted, and only if they pass the
    threshold (ML-GCN's ``overall_topk``). Per class c: Nc true positives, Np predicted, Ng positive.

    * CP = mean over classes of Nc/Np, where a class with no predicted positive has precision 0
      (ML-GCN sets Np = 1 there); CR = mean of Nc/Ng. Both average over the classes with at least
      one positive in ``targets`` (all of them on VOC and COCO; ML-GCN would divide by zero).
    * CF1 = 2·CP·CR / (CP + CR), from the averaged CP and CR, not the mean of per-class F1s.
    * OP = ΣNc / ΣNp, OR = ΣNc / ΣNg, OF1 = 2·OP·OR / (OP + OR): over every label of every image.
      ML-GCN's OP also carries its Np = 1 substitute, so it is lower than this when a class has
      no predicted positive; with predictions in every class the two agree.
    * ``ignore`` (n, C) pairs count nowhere (the devkit's difficult-only images, as in mAP_voc).
    An F1 whose precision and recall are both 0 is 0.
    """
    probabilities = _as_scores(probabilities, 2)
    targets = _as_flags("targets", targets, probabilities.shape)
    counted = np.ones_like(targets) if ignore is None else ~_as_flags("ignore", ignore, probabilities.shape)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    predicted = _predicted_positives(probabilities, threshold, top_k) & counted
    positive = targets & counted
    hits, n_predicted, n_positive = ((predicted & positive).sum(0), predicted.sum(0), positive.sum(0))
    classes = n_positive > 0
    if not classes.any():
        return {name: float("nan") for name in THRESHOLD_METRICS}
    class_precision = hits[classes] / np.maximum(n_predicted[classes], 1)  # 0 when nothing is predicted
    cp, cr = class_precision.mean(), (hits[classes] / n_positive[classes]).mean()
    op, orc = hits.sum() / max(n_predicted.sum(), 1), hits.sum() / n_positive.sum()
    values = (cp, cr, _f1(cp, cr), op, orc, _f1(op, orc))
    return {name: 100.0 * float(v) for name, v in zip(THRESHOLD_METRICS, values)}


def multilabel_metrics(probabilities: np.ndarray, targets: np.ndarray, ignore: np.ndarray | None = None,
                       threshold: float = 0.5, top_k: int = 3) -> dict[str, float]:
    """``threshold_metrics`` for all labels (CP, ..., OF1) and for the top k (CP_top3, ..., OF1_top3)."""
    every = threshold_metrics(probabilities, targets, ignore, threshold)
    top = threshold_metrics(probabilities, targets, ignore, threshold, top_k)
    return every | {f"{name}_top{top_k}": value for name, value in top.items()}
