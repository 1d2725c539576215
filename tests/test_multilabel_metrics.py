"""CP/CR/CF1/OP/OR/OF1 (all labels and top-3) against a hand-worked case, scikit-learn and a port of ML-GCN's code."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_recall_fscore_support

from tools.metrics import THRESHOLD_METRICS, multilabel_metrics, threshold_metrics

# 3 images x 4 classes; class 2 has no positive, image 2 has no score above 0.5
PROBS = np.array([[0.9, 0.6, 0.2, 0.7],
                  [0.4, 0.8, 0.55, 0.1],
                  [0.3, 0.2, 0.1, 0.05]])
TARGETS = np.array([[1, 0, 0, 1],
                    [1, 1, 0, 0],
                    [0, 0, 0, 1]])


def test_hand_worked_all_labels():
    # predicted: image 0 -> {0, 1, 3}, image 1 -> {1, 2}, image 2 -> {}
    # class 0: Nc 1 Np 1 Ng 2; class 1: Nc 1 Np 2 Ng 1; class 2: Np 1, no positive (left out of CP/CR);
    # class 3: Nc 1 Np 1 Ng 2
    got = threshold_metrics(PROBS, TARGETS)
    cp, cr = (1 + 0.5 + 1) / 3, (0.5 + 1 + 0.5) / 3
    assert got["CP"] == pytest.approx(100 * cp) and got["CR"] == pytest.approx(100 * cr)
    assert got["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))  # 74.07, from the averaged CP and CR
    mean_of_f1s = 100 * np.mean([2 * 1 * 0.5 / 1.5, 2 * 0.5 * 1 / 1.5, 2 * 1 * 0.5 / 1.5])
    assert got["CF1"] != pytest.approx(mean_of_f1s)  # 66.67: the definition matters
    assert got["OP"] == pytest.approx(60.0) and got["OR"] == pytest.approx(60.0)  # 3 of 5 predicted, 3 of 5 positives
    assert got["OF1"] == pytest.approx(60.0)


def test_hand_worked_top1_and_a_class_without_predictions():
    # top-1: image 0 -> class 0, image 1 -> class 1, image 2 -> class 0 fails 0.5 -> nothing
    # class 3 has no predicted positive: precision 0 (ML-GCN), still counted in CP
    got = threshold_metrics(PROBS, TARGETS, top_k=1)
    cp, cr = (1 + 1 + 0) / 3, (0.5 + 1 + 0) / 3
    assert got["CP"] == pytest.approx(100 * cp) and got["CR"] == pytest.approx(100 * cr)
    assert got["CF1"] == pytest.approx(100 * 2 * cp * cr / (cp + cr))
    assert got["OP"] == pytest.approx(100.0) and got["OR"] == pytest.approx(40.0)
    assert got["OF1"] == pytest.approx(100 * 2 * 1 * 0.4 / 1.4)


def test_threshold_is_inclusive_and_top_k_ties_go_to_the_lower_class():
    probs = np.array([[0.5, 0.7, 0.7, 0.7]])
    targets = np.array([[1, 0, 0, 1]])
    assert threshold_metrics(probs, targets)["OR"] == pytest.approx(100.0)  # 0.5 counts as predicted
    # top-2 of three tied 0.7s: classes 1 and 2 (lower indices), not class 3
    assert threshold_metrics(probs, targets, top_k=2)["OP"] == pytest.approx(0.0)
    assert threshold_metrics(probs, targets, top_k=3)["OP"] == pytest.approx(100 / 3)


def test_multilabel_metrics_names_both_sets():
    got = multilabel_metrics(PROBS, TARGETS)
    assert set(got) == set(THRESHOLD_METRICS) | {f"{n}_top3" for n in THRESHOLD_METRICS}
    assert got["OF1"] == threshold_metrics(PROBS, TARGETS)["OF1"]
    assert got["OF1_top3"] == threshold_metrics(PROBS, TARGETS, top_k=3)["OF1"]


def random_case(seed: int, n: int = 300, classes: int = 12):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < rng.uniform(0.02, 0.4, classes)).astype(int)
    targets[:, 0] = 0  # a class without positives
    probs = 1 / (1 + np.exp(-(rng.normal(size=(n, classes)) * 2 + 2.5 * targets - 1.5)))
    probs[:, 1] = np.minimum(probs[:, 1], 0.49)  # a class that is never predicted
    return probs, targets


def sklearn_oracle(probs, targets, top_k=None, ignore=None):
    predicted = probs >= 0.5
    if top_k is not None:
        rank = np.argsort(np.argsort(-probs, axis=1, kind="stable"), axis=1, kind="stable")
        predicted &= rank < top_k
    y_true, y_pred = targets.copy(), predicted.astype(int)
    if ignore is not None:  # an ignored pair is neither a positive nor a prediction
        y_true[ignore], y_pred[ignore] = 0, 0
    with_positives = np.flatnonzero(y_true.sum(0) > 0)
    cp, cr, _, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", labels=with_positives,
                                                   zero_division=0)
    op, orc, of1, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0)
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": orc, "OF1": of1}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top_k", [None, 3])
def test_matches_sklearn_macro_and_micro(seed, top_k):
    probs, targets = random_case(seed)
    rng = np.random.default_rng(100 + seed)
    ignore = (rng.random(targets.shape) < 0.05) & (targets > 0)
    for case_ignore in (None, ignore):
        got = threshold_metrics(probs, targets, case_ignore, top_k=top_k)
        want = sklearn_oracle(probs, targets, top_k, case_ignore)
        for name in THRESHOLD_METRICS:
            assert got[name] == pytest.approx(100 * want[name], abs=1e-9), name


def ml_gcn_evaluation(scores_: np.ndarray, targets_: np.ndarray) -> tuple[float, ...]:
    """A literal port of ML-GCN's AveragePrecisionMeter.evaluation (scores are logits; predicted at >= 0)."""
    n, n_class = scores_.shape
    nc, np_, ng = np.zeros(n_class), np.zeros(n_class), np.zeros(n_class)
    for k in range(n_class):
        scores, targets = scores_[:, k], targets_[:, k]
        ng[k] = np.sum(targets == 1)
        np_[k] = np.sum(scores >= 0)
        nc[k] = np.sum(targets * (scores >= 0))
    np_[np_ == 0] = 1
    op, orc = np.sum(nc) / np.sum(np_), np.sum(nc) / np.sum(ng)
    cp, cr = np.sum(nc / np_) / n_class, np.sum(nc / ng) / n_class
    return op, orc, 2 * op * orc / (op + orc), cp, cr, 2 * cp * cr / (cp + cr)


def ml_gcn_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """ML-GCN's overall_topk input: +1 where a top-k score is >= 0, else -1."""
    scores = np.zeros_like(logits) - 1
    for i, row in enumerate(logits):
        for ind in np.argsort(-row, kind="stable")[:k]:
            scores[i, ind] = 1 if row[ind] >= 0 else -1
    return scores


@pytest.mark.parametrize("seed", range(3))
def test_equals_ml_gcn_where_every_class_has_positives(seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((200, 10)) < 0.3).astype(int)
    targets[0] = 1  # every class has a positive
    logits = rng.normal(size=targets.shape) * 2 + 2 * targets - 1
    logits[:, 4] = -np.abs(logits[:, 4]) - 0.1  # class 4 is never predicted: ML-GCN's Np = 1 rule
    probs = 1 / (1 + np.exp(-logits))
    ref = dict(zip(("OP", "OR", "OF1", "CP", "CR", "CF1"), ml_gcn_evaluation(logits, targets)))
    got = threshold_metrics(probs, targets)
    for name in ("CP", "CR", "CF1", "OR"):  # class-averaged ones: identical, the unpredicted class at precision 0
        assert got[name] == pytest.approx(100 * ref[name], abs=1e-9), name
    assert got["OP"] > 100 * ref["OP"]  # ML-GCN's Np = 1 substitute also enters ΣNp (documented)
    nc = ((probs >= 0.5) & (targets > 0)).sum()
    assert 100 * nc / (probs >= 0.5).sum() == pytest.approx(got["OP"])
    logits[:, 4] = np.abs(logits[:, 4])  # now every class is predicted somewhere: OP agrees too
    probs = 1 / (1 + np.exp(-logits))
    for k, suffix in ((None, ""), (3, "_top3")):
        ref = dict(zip(("OP", "OR", "OF1", "CP", "CR", "CF1"),
                       ml_gcn_evaluation(logits if k is None else ml_gcn_top_k(logits, k), targets)))
        got = multilabel_metrics(probs, targets)
        if k is not None and (ml_gcn_top_k(logits, k) >= 0).sum(0).min() == 0:
            continue  # top-3 left a class unpredicted: OP differs as above
        for name in THRESHOLD_METRICS:
            assert got[name + suffix] == pytest.approx(100 * ref[name], abs=1e-9), name + suffix


def test_edge_cases():
    nothing = threshold_metrics(np.zeros((4, 3)), np.eye(4, 3))
    assert nothing == {"CP": 0.0, "CR": 0.0, "CF1": 0.0, "OP": 0.0, "OR": 0.0, "OF1": 0.0}
    perfect = threshold_metrics(np.eye(4, 3), np.eye(4, 3))
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    assert all(np.isnan(v) for v in threshold_metrics(np.ones((2, 3)), np.zeros((2, 3))).values())
    with pytest.raises(ValueError):
        threshold_metrics(PROBS, TARGETS[:, :3])
    with pytest.raises(ValueError):
        threshold_metrics(PROBS, TARGETS, top_k=0)
