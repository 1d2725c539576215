"""tools/cam_metrics.py against hand-worked cases and direct computations."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tools.cam_metrics import (
    HitTally,
    argmax_points,
    box_array,
    box_distances,
    confusion_matrix,
    foreground,
    iou_per_class,
    label_mask,
    mean_iou,
    palette_image,
    score_points,
    threshold_confusions,
    voc_colormap,
)
from tools.voc import VOCObject

# ----------------------------------------------------------------------------- mIoU
GT = np.array([[0, 0, 1, 255],
               [1, 1, 2, 2],
               [0, 255, 2, 1]], np.uint8)
PRED = np.array([[0, 1, 1, 2],
                 [1, 0, 2, 2],
                 [0, 0, 0, 1]], np.uint8)
# (truth, prediction) counts of the 10 pixels that are not 255, worked out by hand
HAND = np.array([[2, 1, 0],
                 [1, 3, 0],
                 [1, 0, 2]])


def test_confusion_matrix_ignores_255_and_matches_a_hand_count():
    assert (confusion_matrix(PRED, GT, num_classes=3) == HAND).all()
    full = confusion_matrix(PRED, GT)
    assert full.shape == (21, 21) and full.sum() == 10 and (full[:3, :3] == HAND).all()


def test_iou_and_mean_iou_by_hand():
    # IoU = TP / (row + column - TP): 2/(3+4-2), 3/(4+4-3), 2/(3+2-2)
    assert iou_per_class(HAND) == pytest.approx([0.4, 0.6, 2 / 3])
    full = confusion_matrix(PRED, GT)
    ious = iou_per_class(full)
    assert np.isnan(ious[3:]).all()  # absent from truth and prediction: left out of the mean
    assert mean_iou(full) == pytest.approx((0.4 + 0.6 + 2 / 3) / 3)
    # a class predicted but absent from the truth counts, with IoU 0
    pred = PRED.copy()
    pred[0, 0] = 7
    assert mean_iou(confusion_matrix(pred, GT)) == pytest.approx(np.mean(iou_per_class(confusion_matrix(pred, GT))[
        [0, 1, 2, 7]]))
    assert iou_per_class(confusion_matrix(pred, GT))[7] == 0


def test_bad_truth_labels_and_sizes_are_refused():
    with pytest.raises(ValueError, match="label 30"):
        confusion_matrix(PRED, np.where(GT == 2, 30, GT).astype(np.uint8))
    with pytest.raises(ValueError, match="differ"):
        confusion_matrix(PRED[:2], GT)


def test_label_mask_ties_go_to_background_then_to_the_first_class():
    cams = np.array([[[0.3, 0.5, 0.2]],
                     [[0.3, 0.4, 0.25]]], np.float32)  # classes 4 and 9 -> labels 5 and 10
    assert label_mask(cams, [4, 9], 0.3).tolist() == [[0, 5, 0]]  # 0.3 is not above 0.3
    assert label_mask(cams, [4, 9], 0.2).tolist() == [[5, 5, 10]]  # the 0.3 tie goes to class 4
    assert label_mask(np.zeros((0, 2, 2), np.float32), [], 0.0).tolist() == [[0, 0], [0, 0]]


def test_threshold_sweep_equals_one_mask_per_threshold():
    rng = np.random.default_rng(0)
    cams = (np.round(rng.random((3, 17, 23)) * 20) / 20).astype(np.float32)  # many ties with the thresholds
    classes = [2, 11, 19]
    truth = rng.choice([0, 3, 12, 20, 255], size=(17, 23)).astype(np.uint8)
    thresholds = [round(0.05 * i, 10) for i in range(1, 13)]
    value, labels = foreground(cams, classes)
    sweep = threshold_confusions(value, labels, truth, thresholds)
    for t, matrix in zip(thresholds, sweep):
        assert (matrix == confusion_matrix(label_mask(cams, classes, t), truth)).all(), t


# ----------------------------------------------------------------------------- palette PNGs
def test_voc_colormap_known_entries():
    colours = voc_colormap()
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    known = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128), 8: (64, 0, 0),
             15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for label, rgb in known.items():
        assert tuple(colours[label]) == rgb, label


def test_palette_image_round_trip(tmp_path):
    mask = np.array([[0, 1, 2], [15, 20, 255]], np.uint8)
    palette_image(mask).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P" and image.size == (3, 2)
        assert (np.array(image) == mask).all()
        assert image.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
        assert tuple(np.array(image.convert("RGB"))[1, 0]) == (192, 128, 128)  # person's colour
    with pytest.raises(ValueError):
        palette_image(mask.astype(np.int32))


# ----------------------------------------------------------------------------- boxes and points
def test_box_distances_by_hand():
    box = np.array([[3, 2, 5, 4]])  # VOC 1-based inclusive: x 2..4, y 1..3 in 0-based pixels
    points = np.array([[1, 2], [3, 4], [0, 2], [7, 8], [6, 0], [2.5, 4.5]])
    expected = [0, 0, 1, math.sqrt(32), math.sqrt(13), 0.5]
    assert box_distances(points, box)[:, 0] == pytest.approx(expected)


def test_score_points_takes_the_nearest_candidate_and_misses_without_one():
    boxes = np.array([[1, 1, 2, 2], [11, 11, 20, 20]])  # 0-based x,y 0..1 and 10..19
    hits, distances = score_points(np.array([[5, 1], [15, 12], [0, 0]]), [boxes, boxes, boxes[:0]])
    assert hits.tolist() == [False, True, False]
    assert distances.tolist() == [4.0, 0.0, math.inf]


def test_box_array_rows():
    objects = [VOCObject("dog", (1, 2, 3, 4), False), VOCObject("person", (5, 6, 7, 8), True)]
    assert box_array(objects).tolist() == [[11, 1, 2, 3, 4], [14, 5, 6, 7, 8]]
    assert box_array([]).shape == (0, 5)


def test_argmax_points_first_maximum_and_empty_maps():
    maps = torch.zeros(3, 4, 5)
    maps[0, 1, 3] = maps[0, 2, 0] = 0.9  # tie: raster order
    maps[1, 3, 4] = 0.2
    points, valid = argmax_points(maps)
    assert points.tolist() == [[1, 3], [3, 4], [0, 0]] and valid.tolist() == [True, True, False]


def test_hit_tally_merges_and_summarises():
    a, b = HitTally(), HitTally()
    a.add("cmax", [True, False], [0.0, 3.0])
    b.add("cmax", [False], [math.inf])  # no box: a miss, left out of the mean distance
    b.add("pointing_game", [True, True, False])
    a.merge(b)
    summary = a.summary()
    assert summary["cmax"] == {"hit_rate": pytest.approx(100 / 3), "count": 3, "distance": 1.5}
    assert summary["pointing_game"] == {"hit_rate": pytest.approx(200 / 3), "count": 3}


def test_a_strategy_dropped_on_one_rank_is_dropped_from_the_merged_tally():
    """DDP: a plug-in that fails on one rank's images is left out of the merged rates (not a rate over the
    other ranks' images), whichever side of the merge dropped it."""
    a, b = HitTally(), HitTally(dropped={"old": "failed before"})
    a.add("plugin", [True, True], [0.0, 0.0])
    a.add("cmax", [True], [0.0])
    b.add("plugin", [False])
    b.drop("plugin", "it raised")
    b.add("plugin", [True])  # after the drop: ignored
    b.add("cmax", [False], [2.0])
    a.merge(b)
    summary = a.summary()
    assert set(summary) == {"cmax"} and summary["cmax"]["count"] == 2
    assert a.dropped == {"old": "failed before", "plugin": "it raised"}
    a.add("plugin", [True])
    assert "plugin" not in a.summary()
