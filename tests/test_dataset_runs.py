"""Training on every dataset format, in-process with an OASS script's defaults: --demo voc|coco|list, VOC2007
and a list folder with its own classes; the tools on such a run; bad input through the trainer; and a bad
image met mid-run, which saves the last checkpoint so that --resume after the fix loses nothing."""
from __future__ import annotations

import json
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import core.data
import evaluate_classification
import infer
import train_classification as plain_script
import train_classification_with_puzzle_cTopk_w_ema as oass_script
from core.config import parse_args
from core.trainer import main, train
from tools.demo_formats import generate_demo
from tools.voc import VOC_CLASSES

TINY = dict(num_train=16, num_val=10, min_side=48, max_side=64, seed=1)
SMALL = ["--architecture", "resnet18", "--mode", "normal", "--pretrained", "none", "--image_size", "64",
         "--min_image_size", "48", "--max_image_size", "80", "--batch_size", "4", "--num_workers", "0",
         "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8", "--max_iterations", "2"]
METRICS = ("mAP", "mAP_voc", "CP", "CR", "CF1", "OP", "OR", "OF1", "CF1_top3", "OF1_top3")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def tiny_demo_cache(tmp_path, monkeypatch):
    """--demo builds the tiny version of each demo set into a private cache."""
    monkeypatch.setenv("OASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(core.data, "generate_demo", partial(generate_demo, **TINY))


def history_of(out: Path, tag: str) -> dict:
    return json.loads((out / "data" / f"{tag}.json").read_text())


def check_run(history: dict, out: Path, tag: str, class_names: tuple[str, ...]) -> None:
    assert history["class_names"] == list(class_names) and history["config"]["num_classes"] == len(class_names)
    last = history["validation"][-1]
    assert last["iteration"] == 2 and all(0 <= last[k] <= 100 for k in METRICS)
    assert len(last["ap"]) == len(class_names)
    log = (out / "logs" / f"{tag}.txt").read_text()
    assert "CF1" in log and "OF1" in log and "top-3" in log
    state = torch.load(out / "models" / f"{tag}_last.pth", weights_only=False)["model"]
    assert state["head.weight"].shape[0] == len(class_names)  # the head has one output per class of the data


@pytest.mark.parametrize("demo,dataset,first_classes", [
    ("voc", "voc2012", VOC_CLASSES[:2]),
    ("coco", "coco2014", ("person", "bicycle")),
    ("list", "list", VOC_CLASSES[:2]),
])
def test_each_demo_format_trains(demo, dataset, first_classes, tmp_path):
    out = tmp_path / "exp"
    args = parse_args(oass_script.DEFAULTS, ["--demo", demo, *SMALL, "--output_dir", str(out)])
    assert args.tag == ("demo" if demo == "voc" else f"demo-{demo}") + "@ctopk_w"
    history = train(args)
    assert history["dataset"] == dataset and tuple(history["class_names"][:2]) == first_classes
    assert (history["config"]["train_split"], history["config"]["val_split"]) == \
        {"voc": ("main:train", "main:val"), "coco": ("train2014", "val2014"), "list": ("train", "val")}[demo]
    check_run(history, out, args.tag, tuple(history["class_names"]))


def test_voc2007_trains_on_trainval_and_tests_on_test(tiny_voc, tmp_path):
    root = Path(shutil.copytree(tiny_voc, tmp_path / "VOCdevkit" / "VOC2007"))
    main_lists = root / "ImageSets" / "Main"
    (main_lists / "train.txt").rename(main_lists / "trainval.txt")
    (main_lists / "val.txt").rename(main_lists / "test.txt")
    out = tmp_path / "exp"
    history = train(parse_args(oass_script.DEFAULTS, ["--data_dir", str(tmp_path), *SMALL, "--output_dir", str(out),
                                                      "--tag", "voc07"]))
    assert history["dataset"] == "voc2007"
    assert (history["config"]["train_split"], history["config"]["val_split"]) == ("trainval", "test")
    assert history["validation"][-1]["num_images"] == 10
    check_run(history, out, "voc07", VOC_CLASSES)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A list folder with 23 classes (3 never seen) and a 2-iteration run on it."""
    base = tmp_path_factory.mktemp("own")
    root = generate_demo("list", base / "data", **TINY)
    with open(root / "classes.txt", "a") as f:
        f.write("unicorn\nsea serpent\ngriffin\n")
    out = base / "exp"
    history = train(parse_args(oass_script.DEFAULTS, ["--data_dir", str(root), *SMALL, "--output_dir", str(out),
                                                      "--tag", "own"]))
    return root, out, history


def test_own_classes_reach_the_head_history_and_tools(own_run, capsys):
    root, out, history = own_run
    names = (*VOC_CLASSES, "unicorn", "sea serpent", "griffin")
    check_run(history, out, "own", names)
    assert history["validation"][-1]["ap"][-1] is None or np.isnan(history["validation"][-1]["ap"][-1])
    evaluate_classification.main(["--tag", "own", "--checkpoint", "last", "--output_dir", str(out),
                                  "--num_workers", "0"])
    printed = capsys.readouterr().out
    assert "sea serpent" in printed and "CF1" in printed and "top-3" in printed
    result = json.loads((out / "data" / "own_eval_val.json").read_text())
    last = history["validation"][-1]
    for key in METRICS:  # the same protocol as the training loop's validation: the same numbers
        assert result[key] == pytest.approx(last[key], abs=1e-9), key
    assert [row["class"] for row in result["classes"]] == list(names)
    image = next((root / "images" / "val").rglob("*.jpg"))
    predictions = infer.infer(infer.build_parser().parse_args([str(image), "--tag", "own", "--checkpoint", "last",
                                                               "--output_dir", str(out), "--threshold", "0"]))
    assert {name for name, _ in predictions[0][1]} == set(names)


# ----------------------------------------------------------------------------- bad input through the trainer
def run_main(argv: list[str], monkeypatch, capsys, defaults: dict = oass_script.DEFAULTS) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as info:
        main(defaults)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return info.value.code, lines[-1]


@pytest.mark.parametrize("break_it,words", [
    (lambda root: (root / "annotations" / "instances_val2014.json").unlink(), ["instances_val2014.json",
                                                                               "annotations_trainval2014.zip"]),
    (lambda root: (root / "annotations" / "instances_train2014.json").write_text('{"images": []}'),
     ["instances_train2014.json", "not a COCO instances file"]),
])
def test_coco_bad_input_stops_before_writing(break_it, words, tmp_path, monkeypatch, capsys):
    root = generate_demo("coco", tmp_path / "coco", **TINY)
    break_it(root)
    code, line = run_main(["--data_dir", str(root), *SMALL, "--output_dir", str(tmp_path / "exp")], monkeypatch,
                          capsys)
    assert code == 2 and line.startswith("error: ") and all(w in line for w in words), line
    assert not (tmp_path / "exp").exists()


def test_dataset_mismatch_and_bad_demo_flags(tiny_voc, tmp_path, monkeypatch, capsys):
    code, line = run_main(["--data_dir", str(tiny_voc), "--dataset", "coco2014", *SMALL, "--output_dir",
                           str(tmp_path / "exp")], monkeypatch, capsys)
    assert code == 2 and "--dataset coco2014 does not match" in line
    code, line = run_main(["--demo", "imagenet", "--output_dir", str(tmp_path / "exp")], monkeypatch, capsys)
    assert code == 2 and "--demo" in line and "imagenet" in line
    code, line = run_main(["--demo", "coco", "--dataset", "list", *SMALL, "--output_dir", str(tmp_path / "exp")],
                          monkeypatch, capsys)
    assert code == 2 and "--dataset list does not match" in line
    assert not (tmp_path / "exp").exists()
    assert parse_args({}, ["--demo=list"]).demo == "list" and parse_args({}, ["--demo"]).val_split == "main:val"
    assert parse_args({}, ["--demo", "coco"]).val_split is None  # resolved to val2014 by the dataset


def test_a_script_changes_the_demo_recipe_only_under_demo():
    """A script's "demo_recipe" (none ships one today) changes --demo's values and nothing else; the shared demo
    keeps the script's own method and the reference's optimiser (README: the miniature experiment)."""
    import train_classification_with_puzzle_max as max_script

    recipe = {"head": "gap", "tile_calls": "batch", "lr": 0.01}
    defaults = {**max_script.DEFAULTS, "demo_recipe": recipe}
    demo = vars(parse_args(defaults, ["--demo"]))
    assert all(demo[name] == value for name, value in recipe.items())
    real = parse_args(defaults, ["--data_dir", "unused"])  # the reference's values without --demo
    assert (real.head, real.tile_calls, real.reference_gpus, real.lr) == ("csi", "task", 4, 0.1)
    assert parse_args(defaults, ["--demo", "--tile_calls", "task"]).tile_calls == "task"  # flags win
    own = parse_args(oass_script.DEFAULTS, ["--demo"])  # a shipped OASS script: its own recipe, scaled down
    assert (own.head, own.tile_calls, own.reference_gpus, own.lr, own.momentum, own.alpha_schedule_re) == \
        ("csi", "task", 4, 0.1, 1e-4, 0.05)
    assert (own.architecture, own.pretrained, own.image_size, own.batch_size, own.max_epoch) == \
        ("resnet18", "demo", 112, 16, 3)
    # Max's one measured exception (README, Results), and nothing else of its recipe changes
    assert max_script.DEFAULTS["demo_recipe"] == {"head": "gap", "tile_calls": "batch"}
    max_demo = parse_args(max_script.DEFAULTS, ["--demo"])
    assert (max_demo.head, max_demo.tile_calls, max_demo.reference_gpus, max_demo.lr) == ("gap", "batch", 4, 0.1)


# ----------------------------------------------------------------------------- a bad image mid-run
def test_bad_image_mid_run_saves_last_and_resume_loses_nothing(tmp_path, monkeypatch, capsys):
    root = generate_demo("list", tmp_path / "data", **TINY)
    flags = ["--data_dir", str(root), *SMALL[:-1], "4", "--output_dir", str(tmp_path / "exp")]
    train(parse_args(plain_script.DEFAULTS, [*flags, "--tag", "straight"]))
    # the first epoch's second batch (iteration 1) holds training image order[5]
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    train_paths = [line.split(",")[0] for line in (root / "train.csv").read_text().splitlines()[1:]]
    bad = root / train_paths[int(order[5])]
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    code, line = run_main([*flags, "--tag", "cut"], monkeypatch, capsys, plain_script.DEFAULTS)
    assert code == 2 and bad.name in line and "truncated" in line and "--resume" in line, line
    saved = torch.load(tmp_path / "exp" / "models" / "cut_last.pth", weights_only=False)
    assert saved["iteration"] == 1  # iteration 0 was done and is kept
    bad.write_bytes(good)
    resumed = train(parse_args(plain_script.DEFAULTS, [*flags, "--tag", "cut", "--resume"]))
    straight = torch.load(tmp_path / "exp" / "models" / "straight_last.pth", weights_only=False)["model"]
    final = torch.load(tmp_path / "exp" / "models" / "cut_last.pth", weights_only=False)["model"]
    assert all(torch.equal(straight[k], final[k]) for k in straight)
    assert [v["iteration"] for v in resumed["validation"]] == [4]


def test_bad_val_image_saves_last_and_resume_validates(tmp_path, monkeypatch, capsys):
    root = generate_demo("list", tmp_path / "data", **TINY)
    flags = ["--data_dir", str(root), *SMALL, "--output_dir", str(tmp_path / "exp"), "--tag", "val_cut"]
    bad = root / (root / "val.csv").read_text().splitlines()[3].split(",")[0]
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    code, line = run_main(flags, monkeypatch, capsys, plain_script.DEFAULTS)
    assert code == 2 and bad.name in line and "--resume" in line
    assert torch.load(tmp_path / "exp" / "models" / "val_cut_last.pth", weights_only=False)["iteration"] == 2
    bad.write_bytes(good)
    history = train(parse_args(plain_script.DEFAULTS, [*flags, "--resume"]))
    assert [v["iteration"] for v in history["validation"]] == [2]  # the validation that failed is done now
    assert (tmp_path / "exp" / "models" / "val_cut_best.pth").is_file()


