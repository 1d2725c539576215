"""The plug-in strategy of docs/extending.md (strategies/centroid.py): registered without any edit to core/,
picked up by the parser, the hit rates and visualize_cams.py, trained for a few iterations on the tiny demo
set, and its keypoints checked against a direct numpy centroid. Then the keypoint contract, with plug-ins
broken on purpose (registered by these tests only): each stops its own training in one line, and none
stops another run's validation."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from tool_calls import call

import core.data
import train_classification_with_puzzle_centroid_ema as centroid_script
import visualize_cams
from core.builder import make_cams
from core.config import build_parser, parse_args
from core.inspection import load_run, predict_with_cams
from core.keypoints import argmax_cuts, upsample_maps
from core.localisation import DISPLAY_NAMES, KEYPOINT_STRATEGIES, flat_summary, keypoint_strategies, score_localisation
from core.strategies import STRATEGIES, KeypointContext, KeypointError, Strategy, build_tasks, register_strategy
from core.trainer import train
from strategies.centroid import centroid_keypoints
from tools.cam_metrics import HitTally
from tools.demo_formats import generate_demo
from tools.errors import run_cli

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


# ----------------------------------------------------------------------------- broken plug-ins
# Registered for the length of a test only (the `broken_plugins` fixture), never shipped in strategies/.
def float_cuts(maps: torch.Tensor, ctx: KeypointContext) -> torch.Tensor:
    return centroid_keypoints(maps, ctx).double() + 0.5  # forgot to floor


def flat_cuts(maps: torch.Tensor, ctx: KeypointContext) -> torch.Tensor:
    return centroid_keypoints(maps, ctx)[:, 0]  # (N,): only y


def edge_cuts(maps: torch.Tensor, ctx: KeypointContext) -> torch.Tensor:
    cuts = centroid_keypoints(maps, ctx).clone()
    cuts[0, 0] = 0  # an empty top row of tiles
    cuts[-1, 1] = maps.shape[2]  # an empty right column of tiles
    return cuts


def raising_cuts(maps: torch.Tensor, ctx: KeypointContext) -> torch.Tensor:
    raise ValueError("no second peak in this map")


RAISE_LINE = raising_cuts.__code__.co_firstlineno + 1
BROKEN = {  # name: (keypoint function, the rule its one-line error names)
    "broken_float": (float_cuts, "its cuts must be integer pixel positions (torch.int64), got torch.float64"),
    "broken_flat": (flat_cuts, "its cuts must have shape (N, 2), one (y, x) row per map, got ("),
    "broken_range": (edge_cuts, "its (y, x) cuts must lie in [1, size - 1]"),
    "broken_raise": (raising_cuts, "its keypoint function raised ValueError: no second peak in this map (at "
                                   f"test_plugin_strategy.py:{RAISE_LINE})"),
}
PLAIN_FLAGS = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode",
               "normal", "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size",
               "80", "--num_workers", "0", "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8",
               "--print_ratio", "1"]


@pytest.fixture
def broken_plugins():
    for name, (function, _) in BROKEN.items():
        register_strategy(Strategy(name, "a deliberately broken plug-in", True, True, function, "teacher",
                                   module="tests.broken_plugins"))
    yield
    for name in BROKEN:  # never leak into other tests (parser choices, hit rates, docs/flags.md)
        STRATEGIES.pop(name, None)


def train_cli(defaults: dict, argv: list, capsys) -> tuple[int, str, str]:
    """A training script's main, in this process: (exit code, stdout, stderr)."""
    return call(lambda args: run_cli(lambda: train(parse_args(defaults, args))), argv, capsys)


def test_build_tasks_checks_each_rule_of_the_keypoint_contract(broken_plugins):
    generator = torch.Generator().manual_seed(4)
    cams = torch.rand(3, 20, 4, 4, generator=generator)
    labels = torch.zeros(3, 20)
    labels[0, 1] = labels[1, [2, 5]] = labels[2, 7] = 1.0
    for name in ("broken_float", "broken_flat", "broken_raise"):
        with pytest.raises(KeypointError) as error:
            build_tasks(STRATEGIES[name], cams, labels, labels, (64, 64))
        assert str(error.value).startswith(f"strategy {name} (tests.broken_plugins): {BROKEN[name][1]}")
    # out of range: found on the device (no sync), clamped so that the step stays in the image, raised when read
    tasks = build_tasks(STRATEGIES["broken_range"], cams, labels, labels, (64, 64))
    centroid = build_tasks(STRATEGIES["centroid"], cams, labels, labels, (64, 64)).keypoints
    assert int(tasks.outside) == 2 and tasks.keypoints[0, 0] == 1 and tasks.keypoints[-1, 1] == 63
    assert torch.equal(tasks.keypoints[1:-1], centroid[1:-1]) and tasks.keypoints.dtype == torch.int64
    with pytest.raises(KeypointError, match=r"lie in \[1, size - 1\] .*, 2 of 4 did not"):
        tasks.check_inside(STRATEGIES["broken_range"])
    # a valid strategy: nothing outside, its cuts unchanged
    cmax = build_tasks(STRATEGIES["cmax"], cams, labels, labels, (64, 64))
    maps = upsample_maps(cams[labels.nonzero(as_tuple=True)], (64, 64))
    assert int(cmax.outside) == 0 and torch.equal(cmax.keypoints, argmax_cuts(maps))


def test_validation_scoring_skips_a_failing_plugin_and_keeps_the_others(broken_plugins):
    generator = torch.Generator().manual_seed(5)
    cams = torch.rand(2, 20, 4, 4, generator=generator)
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, [3, 9]] = 1.0
    boxes = [np.array([[3, 1, 1, 30, 30]]), np.array([[3, 20, 20, 64, 64], [9, 1, 1, 64, 64]])]
    tally = HitTally()
    for _ in range(2):  # the second batch does not try them again
        score_localisation(tally, cams, labels, boxes, (64, 64), 5, 8)
    assert set(tally.dropped) == set(BROKEN)
    assert all(tally.dropped[name].startswith(f"strategy {name} ") for name in BROKEN)
    summary = flat_summary(tally)
    assert not any(name in key for key in summary for name in BROKEN)
    assert {"hit_rate_centroid", "hit_rate_cmax", "hit_rate_max"} <= set(summary)
    assert tally.summary()["centroid"]["count"] == 6  # 3 positive classes x 2 batches
    # a built-in strategy that fails is a bug: not skipped
    impostor = Strategy("broken_builtin", "x", True, True, raising_cuts, "teacher", module="core.strategies")
    STRATEGIES["broken_builtin"] = impostor
    try:
        with pytest.raises(ValueError, match="no second peak"):
            score_localisation(HitTally(), cams, labels, boxes, (64, 64), 5, 8)
    finally:
        STRATEGIES.pop("broken_builtin")


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_plugin_stops_its_own_training_in_one_line(name, broken_plugins, tiny_voc, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["--strategy", name, "--data_dir", tiny_voc, *PLAIN_FLAGS, "--batch_size", "4", "--max_iterations", "2",
            "--output_dir", out]
    code, _, err = train_cli(centroid_script.DEFAULTS, argv, capsys)
    line = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and line.startswith(f"error: strategy {name} (tests.broken_plugins)")
    assert BROKEN[name][1] in line and "docs/extending.md#the-keypoint-function" in line
    if name == "broken_range":  # seen on the device at iteration 1, read at the log line of iteration 2
        assert "at iteration 1:" in line and "found at iteration 2" in line and "no checkpoint was written yet" in line
    assert not list((out / "models").glob("*.pth"))


@pytest.mark.usefixtures("single_thread")
def test_a_baseline_run_validates_with_broken_plugins_installed(broken_plugins, tiny_voc, tmp_path, capsys):
    out = tmp_path / "exp"
    argv = ["--strategy", "none", "--data_dir", tiny_voc, *PLAIN_FLAGS, "--batch_size", "8", "--max_epoch", "2",
            "--output_dir", out, "--tag", "plain"]
    code, stdout, err = train_cli({}, argv, capsys)
    assert code == 0, err
    history = json.loads((out / "data" / "plain.json").read_text())
    assert len(history["validation"]) == 2 and history["finished_iteration"] == 4
    assert set(history["skipped_strategies"]) == set(BROKEN)
    for name, (_, rule) in BROKEN.items():  # one warning each over the two validations, naming the rule
        warnings = [line for line in stdout.splitlines() if line.startswith(f"# warning: strategy {name} ")]
        assert len(warnings) == 1 and rule in warnings[0] and "left out of this run's validations" in warnings[0]
    for record in history["validation"]:
        assert not any(name in key for key in record for name in BROKEN)
        assert 0 <= record["hit_rate_centroid"] <= 100 and 0 <= record["hit_rate_cmax"] <= 100
    assert (out / "models" / "plain_best.pth").is_file() and (out / "models" / "plain_last.pth").is_file()


def test_visualize_leaves_a_failing_plugin_out_with_one_warning(broken_plugins, monkeypatch):
    star = visualize_cams.MARKERS["centroid"][1]
    monkeypatch.setitem(visualize_cams.MARKERS, "broken_raise", ("broken", star, (1, 2, 3)))  # drawn, as if it had one
    cams = torch.rand(20, 4, 4, generator=torch.Generator().manual_seed(6))
    skipped: set[str] = set()
    with pytest.warns(UserWarning, match="strategy broken_raise .* its marker is left out") as caught:
        for _ in range(2):  # two figures
            points = visualize_cams.strategy_keypoints(cams, [1, 4], 64, 5, 8, skipped=skipped)
    assert len([w for w in caught if "broken_raise" in str(w.message)]) == 1 and skipped == {"broken_raise"}
    assert "broken_raise" not in points and points["cmax"].shape == (2, 2)
