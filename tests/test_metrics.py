"""Average precision vs independent oracles: sklearn, a literal port of the VOC devkit, hand values."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve

from tools.metrics import (
    chance_map,
    mean_average_precision,
    reference_average_precision,
    voc_average_precision,
)


def random_case(seed: int, n: int = 200, prevalence: float = 0.2, tie_levels: int = 0):
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < prevalence).astype(int)
    targets[rng.integers(n)] = 1  # at least one positive
    scores = rng.normal(size=n) + targets  # informative, continuous: no ties
    if tie_levels:
        scores = np.round(scores * tie_levels) / tie_levels  # many ties
    return scores, targets


def devkit_ap(out: np.ndarray, gt: np.ndarray) -> float:
    """Literal port of VOCevalcls + VOCap (VOC2012 devkit); gt: 1 positive, -1 negative, 0 ignored."""
    si = np.argsort(-out, kind="stable")  # [so,si]=sort(-out); MATLAB's sort is stable
    tp = np.cumsum(gt[si] > 0)
    fp = np.cumsum(gt[si] < 0)
    rec = tp / np.sum(gt > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = tp / (fp + tp)  # 0/0 = NaN when ignored items come first, as in MATLAB
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = np.fmax(mpre[i], mpre[i + 1])  # MATLAB's max skips NaN
    i = np.nonzero(mrec[1:] != mrec[:-1])[0] + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def sklearn_interpolated_ap(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the precision envelope, built from sklearn's precision/recall points (no ties)."""
    precision, recall, _ = precision_recall_curve(targets, scores)
    precision, recall = precision[:-1][::-1], recall[:-1][::-1]  # drop the (R=0, P=1) end, ascending R
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * envelope))


# ----------------------------------------------------------------------------- vs sklearn


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prevalence", [0.05, 0.3, 0.7])
def test_reference_ap_equals_sklearn_without_ties(seed, prevalence):
    scores, targets = random_case(seed, prevalence=prevalence)
    assert len(np.unique(scores)) == len(scores)
    assert reference_average_precision(scores, targets) == pytest.approx(
        average_precision_score(targets, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prevalence", [0.05, 0.3, 0.7])
def test_voc_ap_equals_envelope_of_sklearn_curve_without_ties(seed, prevalence):
    scores, targets = random_case(seed, prevalence=prevalence)
    voc = voc_average_precision(scores, targets)
    assert voc == pytest.approx(sklearn_interpolated_ap(scores, targets), abs=1e-12)
    assert voc >= average_precision_score(targets, scores) - 1e-12


# ----------------------------------------------------------------------------- vs the devkit port


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("tie_levels", [0, 2])
def test_voc_ap_matches_devkit_port_with_ignored_items_and_ties(seed, tie_levels):
    scores, targets = random_case(seed, n=150, prevalence=0.3, tie_levels=tie_levels)
    rng = np.random.default_rng(100 + seed)
    ignore = (targets == 1) & (rng.random(len(targets)) < 0.3)  # "difficult only" images
    ignore[np.argmax(scores)] = True  # an ignored item ranked first: the devkit's 0/0 precision
    gt = np.where(ignore, 0, np.where(targets == 1, 1, -1))
    if not (gt > 0).any():
        pytest.skip("every positive ignored")
    assert voc_average_precision(scores, targets, ignore) == pytest.approx(devkit_ap(scores, gt), abs=1e-12)
    assert voc_average_precision(scores, targets) == pytest.approx(
        devkit_ap(scores, np.where(targets == 1, 1, -1)), abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_voc_ap_is_never_below_reference_ap(seed):
    scores, targets = random_case(seed, n=80, prevalence=0.4, tie_levels=3)
    assert voc_average_precision(scores, targets) >= reference_average_precision(scores, targets) - 1e-12


# ----------------------------------------------------------------------------- hand-worked cases


def test_ties_keep_input_order_by_hand():
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    # targets A = [0, 1, 0, 1]: ranking neg, POS, neg, POS (the tied positive comes first in input order)
    #   precision at the positives: 1/2, 2/4 -> reference AP = 0.5
    #   precisions by rank 0, 1/2, 1/3, 1/2 -> envelope at the positives 1/2, 1/2 -> VOC AP = 0.5
    targets_a = np.array([0, 1, 0, 1])
    assert reference_average_precision(scores, targets_a) == pytest.approx(0.5)
    assert voc_average_precision(scores, targets_a) == pytest.approx(0.5)
    # targets B = [0, 0, 1, 1]: ranking neg, neg, POS, POS (the tied negative now comes first)
    #   reference: (1/3 + 2/4) / 2 = 5/12; VOC: envelope (1/2, 1/2) -> 0.5 > 5/12
    targets_b = np.array([0, 0, 1, 1])
    assert reference_average_precision(scores, targets_b) == pytest.approx(5 / 12)
    assert voc_average_precision(scores, targets_b) == pytest.approx(0.5)
    # sklearn treats the tie as one threshold instead: 1/2 * 1/3 + 1/2 * 2/4 = 5/12 for both orders
    assert average_precision_score(targets_a, scores) == pytest.approx(5 / 12)


def test_ignored_items_by_hand():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = np.array([1, 0, 1, 0, 0, 1, 1])
    ignore = np.array([True, False, False, False, False, False, False])
    # VOC, item 0 ignored: ranking neg, POS, neg, neg, POS, POS
    #   precision by rank: 0, 1/2, 1/3, 1/4, 2/5, 3/6; envelope: 1/2, 1/2, 1/2, 1/2, 1/2, 1/2
    #   VOC AP = mean(1/2, 1/2, 1/2) = 0.5   (the plain precisions would give (1/2 + 2/5 + 1/2) / 3 = 7/15)
    assert voc_average_precision(scores, targets, ignore) == pytest.approx(0.5)
    assert reference_average_precision(scores[1:], targets[1:]) == pytest.approx(7 / 15)
    # nothing ignored: ranking POS, neg, POS, neg, neg, POS, POS
    #   precision by rank: 1, 1/2, 2/3, 2/4, 2/5, 3/6, 4/7
    #   reference AP = (1 + 2/3 + 3/6 + 4/7) / 4 = 115/168
    #   envelope at the positives: 1, 2/3, 4/7, 4/7 -> VOC AP = (1 + 2/3 + 4/7 + 4/7) / 4 = 118/168
    assert reference_average_precision(scores, targets) == pytest.approx(115 / 168)
    assert voc_average_precision(scores, targets) == pytest.approx(118 / 168)


def test_perfect_and_worst_rankings():
    targets = np.array([1, 1, 0, 0, 0])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert reference_average_precision(scores, targets) == 1.0
    assert voc_average_precision(scores, targets) == 1.0
    # positives last: precisions 1/4 and 2/5 -> reference (1/4 + 2/5) / 2 = 13/40; VOC (2/5 + 2/5) / 2
    assert reference_average_precision(-scores, targets) == pytest.approx(13 / 40)
    assert voc_average_precision(-scores, targets) == pytest.approx(2 / 5)


def test_no_positive_gives_nan():
    scores = np.array([0.3, 0.2, 0.1])
    assert np.isnan(reference_average_precision(scores, np.zeros(3)))
    assert np.isnan(voc_average_precision(scores, np.zeros(3)))
    # every positive ignored: nothing left to find
    assert np.isnan(voc_average_precision(scores, np.array([1, 0, 0]), np.array([True, False, False])))
    assert np.isnan(reference_average_precision(np.array([]), np.array([])))


# ----------------------------------------------------------------------------- mAP


def test_map_skips_classes_without_positives_and_matches_per_class():
    rng = np.random.default_rng(7)
    scores = np.round(rng.normal(size=(120, 4)), 1)  # some ties
    targets = (rng.random((120, 4)) < 0.3).astype(int)
    targets[:, 1] = 0
    ignore = (targets == 1) & (rng.random((120, 4)) < 0.2)
    ref_map, ref_ap = mean_average_precision(scores, targets, kind="reference")
    voc_map, voc_ap = mean_average_precision(scores, targets, ignore, kind="voc")
    expected_ref = [reference_average_precision(scores[:, c], targets[:, c]) for c in range(4)]
    expected_voc = [voc_average_precision(scores[:, c], targets[:, c], ignore[:, c]) for c in range(4)]
    np.testing.assert_allclose(ref_ap, expected_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(voc_ap, expected_voc, rtol=0, atol=1e-12)
    assert np.isnan(ref_ap[1]) and np.isnan(voc_ap[1])
    assert ref_map == pytest.approx(100 * np.mean(ref_ap[[0, 2, 3]]))
    assert voc_map == pytest.approx(100 * np.mean(voc_ap[[0, 2, 3]]))


def test_map_all_classes_undefined_is_nan():
    mean, per_class = mean_average_precision(np.zeros((5, 2)), np.zeros((5, 2)), kind="voc")
    assert np.isnan(mean) and np.isnan(per_class).all()


def test_argument_validation():
    scores, targets = np.zeros((4, 2)), np.ones((4, 2))
    with pytest.raises(ValueError, match="kind"):
        mean_average_precision(scores, targets, kind="coco")
    with pytest.raises(ValueError, match="ignore"):
        mean_average_precision(scores, targets, np.zeros((4, 2), bool), kind="reference")
    with pytest.raises(ValueError, match="0/1"):
        mean_average_precision(scores, targets * -1)
    with pytest.raises(ValueError, match="shape"):
        mean_average_precision(scores, np.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        reference_average_precision(np.array([np.nan, 1.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="draws"):
        chance_map(targets, draws=0)


# ----------------------------------------------------------------------------- chance level


def test_chance_map_close_to_prevalence_and_deterministic():
    rng = np.random.default_rng(0)
    prevalence = rng.uniform(0.1, 0.5, size=20)
    targets = (rng.random((3000, 20)) < prevalence).astype(int)
    chance = chance_map(targets, draws=10, seed=1)
    # a random ranking's AP is about the prevalence (slightly above: the first hits' precision is noisy)
    assert chance == pytest.approx(100 * targets.mean(), abs=1.5)
    assert chance_map(targets, draws=10, seed=1) == chance
    assert chance_map(targets, draws=10, seed=2) != chance
