"""The plug-in strategy of docs/extending.md (strategies/centroid.py): registered without any edit to core/,
picked up by the parser, the hit rates and visualize_cams.py, trained for a few iterations on the tiny demo
set, and its keypoints checked against a direct numpy centroid."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

import core.data
import train_classification_with_puzzle_centroid_ema as centroid_script
import visualize_cams
from core.builder import make_cams
from core.config import build_parser, parse_args
from core.inspection import load_run, predict_with_cams
from core.localisation import DISPLAY_NAMES, KEYPOINT_STRATEGIES, keypoint_strategies
from core.strategies import STRATEGIES, KeypointContext, Strategy, build_tasks, register_strategy
from core.trainer import train
from strategies.centroid import centroid_keypoints
from tools.demo_formats import generate_demo

TINY = dict(num_train=16, num_val=10, min_side=48, max_side=64, seed=1)
SMALL = ["--architecture", "resnet18", "--mode", "normal", "--pretrained", "none", "--image_size", "64",
         "--min_image_size", "48", "--max_image_size", "80", "--batch_size", "4", "--num_workers", "0",
         "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8", "--max_iterations", "3"]
CONTEXT = KeypointContext(k=5, min_distance=8, keypoint_rule="reference", radius=16)


def numpy_centroid(cam: np.ndarray) -> list[int]:
    """The rule of docs/extending.md written directly: weighted mean of the pixel coordinates, floor, clamp."""
    height, width = cam.shape
    weights = cam.astype(np.float64)
    total = weights.sum()
    if total <= 0:
        return [height // 2, width // 2]
    ys, xs = np.mgrid[0:height, 0:width]
    y, x = int(np.floor((weights * ys).sum() / total)), int(np.floor((weights * xs).sum() / total))
    return [min(max(y, 1), height - 1), min(max(x, 1), width - 1)]


def test_centroid_keypoints_equal_a_direct_numpy_centroid():
    generator = torch.Generator().manual_seed(3)
    maps = torch.relu(torch.randn(12, 40, 56, generator=generator))
    maps[0] = 0.0  # no activation: the centre
    maps[1] = 0.0
    maps[1, 0, 0] = 1.0  # all the weight on pixel (0, 0): clamped to (1, 1)
    maps[2] = 0.0
    maps[2, 39, 55] = 0.5  # the last pixel: clamped to (size - 1) = the pixel itself
    cuts = centroid_keypoints(maps, CONTEXT)
    assert cuts.dtype == torch.int64 and cuts.shape == (12, 2)
    assert cuts.tolist() == [numpy_centroid(m) for m in maps.numpy()]
    assert cuts[:3].tolist() == [[20, 28], [1, 1], [39, 55]]


def test_the_plugin_is_registered_everywhere_without_core_edits():
    strategy = STRATEGIES["centroid"]
    assert strategy.module == "strategies.centroid" and strategy.per_class and strategy.patch_network == "teacher"
    assert "centroid" in keypoint_strategies() and "centroid" in KEYPOINT_STRATEGIES
    assert DISPLAY_NAMES["centroid"] == "centroid"
    assert "centroid" in visualize_cams.MARKERS and "centroid" in visualize_cams.SPLIT_STRATEGIES
    choices = next(a.choices for a in build_parser({})._actions if a.dest == "strategy")
    assert "centroid" in choices
    args = parse_args(centroid_script.DEFAULTS, ["--demo"])
    assert (args.strategy, args.patch_network, args.tile_calls, args.head) == ("centroid", "teacher", "task", "csi")


def test_a_name_taken_by_another_module_is_refused():
    impostor = Strategy("ctopk_w", "shadow", True, True, centroid_keypoints, "teacher", module="somewhere.else")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy(impostor)
    assert STRATEGIES["ctopk_w"].module == "core.strategies"


@pytest.mark.usefixtures("single_thread")
def test_the_centroid_script_trains_and_the_tools_read_its_run(tmp_path, monkeypatch):
    monkeypatch.setenv("OASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core.data, "generate_demo", partial(generate_demo, **TINY))
    out = tmp_path / "exp"
    args = parse_args(centroid_script.DEFAULTS, ["--demo", *SMALL, "--output_dir", str(out)])
    assert args.tag == "demo@centroid"
    history = train(args)
    assert history["config"]["strategy"] == "centroid"
    assert all(row["tasks_per_batch"] > 0 for row in history["train"])
    last = history["validation"][-1]
    assert last["iteration"] == 3 and 0 <= last["hit_rate_centroid"] <= 100
    assert "centroid" in (out / "logs" / "demo@centroid.txt").read_text().split("hits:")[-1]
    saved = json.loads((out / "data" / "demo@centroid.json").read_text())
    assert "box_distance_centroid" in saved["validation"][-1]

    # the trained model's keypoints, through the training loop's build_tasks, against numpy on the same CAMs
    run = load_run("demo@centroid", "last", out, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 64, 64, generator=generator)
    with torch.no_grad():
        cams = make_cams(run.model(images)[1].float())
    labels = torch.zeros(3, cams.shape[1])
    labels[0, [1, 4]] = labels[1, 0] = labels[2, [2, 3, 7]] = 1.0
    tasks = build_tasks(STRATEGIES["centroid"], cams, labels, labels, (64, 64))
    expected = []
    for b in range(3):
        upsampled = predict_with_cams(run.model, images[b], torch.device("cpu"))[2]
        expected += [numpy_centroid(upsampled[c].numpy()) for c in labels[b].nonzero().flatten().tolist()]
    assert tasks.keypoints.tolist() == expected

    # visualize_cams finds the run's plug-in strategy and cuts its tiles with it
    written = visualize_cams.visualize(visualize_cams.build_parser().parse_args(
        ["--tag", "demo@centroid", "--checkpoint", "last", "--output_dir", str(out), "--num", "2"]))
    assert len(written) == 2 and visualize_cams.split_strategy(run.config) == "centroid"
