"""The miniature experiment's parts: the demo backbone, per-image validation scores, run_experiments.py over
scripts x seeds, and compare_experiments.py's groups with their paired bootstrap (against a slow oracle) and
the groups it refuses (recipes, run lengths, a repeated seed)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from conftest import TINY_BACKBONE
from tool_calls import call

import compare_experiments
import run_experiments
from core.config import parse_args
from tools import demo_backbone
from tools.bootstrap import paired_bootstrap, resample_indices, run_maps
from tools.metrics import mean_average_precision

ROOT = Path(__file__).resolve().parents[1]
PLAIN, CTOPK_W = "train_classification.py", "train_classification_with_puzzle_cTopk_w_ema.py"
SMALL = ["--image_size", "64", "--min_image_size", "48", "--max_image_size", "80", "--batch_size", "4",
         "--num_workers", "0", "--min_distance", "8", "--max_iterations", "2", "--print_ratio", "1"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


# ----------------------------------------------------------------------------- the demo backbone
def test_cached_backbone_loads_into_torchvision_and_matches_its_card(tiny_demo_backbone):
    weights, card_path = demo_backbone.backbone_paths(0)
    card = json.loads(card_path.read_text())
    assert card["sha256"] == demo_backbone.file_sha256(weights) and card["seed"] == 0
    assert card["images"] == TINY_BACKBONE["train_images"] and card["epochs"] == TINY_BACKBONE["epochs"]
    assert 0 <= card["pretext_accuracy"] <= 100
    model = tvm.resnet18(num_classes=card["num_classes"])
    model.load_state_dict(torch.load(weights, weights_only=True))  # strict: every key, torchvision's names
    # --pretrained demo puts exactly these weights into the classifier's backbone
    from core.step import build_model

    net = build_model(parse_args({}, ["--demo", "--architecture", "resnet18", "--pretrained", "demo"]))
    assert torch.equal(net.backbone[4][0].conv1.weight, model.layer1[0].conv1.weight)


def test_backbone_is_deterministic_and_its_images_are_its_own():
    first, card = demo_backbone.pretrain(3, recipe=TINY_BACKBONE, log=lambda line: None)
    second, _ = demo_backbone.pretrain(3, recipe=TINY_BACKBONE, log=lambda line: None)
    assert all(torch.equal(first[k], second[k]) for k in first) and card["seed"] == 3
    images, labels = demo_backbone.pretext_set(0, 0, 16)
    again, _ = demo_backbone.pretext_set(0, 8, 8)
    assert torch.equal(images[8:], again) and labels.max() < len(demo_backbone.PRETEXT_CLASSES)
    assert images.shape == (16, 3, demo_backbone.IMAGE_SIZE, demo_backbone.IMAGE_SIZE)


@pytest.mark.parametrize("damage", ["truncate", "wrong_hash"])
def test_a_damaged_backbone_is_rebuilt_with_a_warning(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OASS_CACHE", str(tmp_path))
    demo_backbone.demo_backbone_state(log=lambda line: None)
    weights, card_path = demo_backbone.backbone_paths(0)
    good = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(good[:len(good) // 2])
    else:
        card = json.loads(card_path.read_text())
        card_path.write_text(json.dumps({**card, "sha256": "0" * 64}))
    capsys.readouterr()
    state = demo_backbone.demo_backbone_state(log=lambda line: None)
    err = capsys.readouterr().err
    assert "warning" in err and "rebuilding" in err
    assert json.loads(card_path.read_text())["sha256"] == demo_backbone.file_sha256(weights)
    assert all(torch.equal(v, torch.load(weights, weights_only=True)[k]) for k, v in state.items())


def test_pretrained_demo_needs_resnet18(tmp_path, monkeypatch, capsys):
    from core.trainer import main

    monkeypatch.setattr(sys, "argv", ["train.py", "--demo", "--architecture", "resnet50",
                                      "--output_dir", str(tmp_path / "exp")])
    code, _, err = call(lambda argv: main({}), [], capsys)
    assert "--pretrained demo" in one_error_line(code, err) and "resnet18" in err
    assert not (tmp_path / "exp").exists()
    args = parse_args({}, ["--demo"])
    assert (args.pretrained, args.momentum, args.lr, args.reference_gpus) == ("demo", 1e-4, 0.1, 4)
    assert parse_args({}, ["--demo", "--pretrained", "none"]).pretrained == "none"


# ----------------------------------------------------------------------------- run_experiments + per-image scores
@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> SimpleNamespace:
    """run_experiments.py over 2 scripts x 2 seeds on a tiny VOC set, the first interrupted and continued."""
    from tools.demo_data import generate_demo_dataset

    base = tmp_path_factory.mktemp("experiment")
    voc = generate_demo_dataset(base / "voc", num_train=16, num_val=12, min_side=48, max_side=64, seed=2)
    out = base / "exp"
    flags = ["--data_dir", str(voc), "--train_split", "main:train", "--val_split", "main:val", "--architecture",
             "resnet18", "--pretrained", "demo", *SMALL, "--output_dir", str(out)]
    argv = [sys.executable, str(ROOT / "run_experiments.py"), "--scripts", PLAIN, CTOPK_W, "--seeds", "0", "1",
            "--prefix", "t", *flags]
    env = {**__import__("os").environ, **ONE_THREAD}
    # a run killed after its first checkpoint: trained directly with one iteration, as if stopped there
    first = subprocess.run([sys.executable, str(ROOT / PLAIN), *flags, "--seed", "0", "--tag", "t@none@seed0",
                            "--max_iterations", "1"], cwd=base, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    dry = subprocess.run([*argv, "--dry_run"], cwd=base, capture_output=True, text=True, env=env, timeout=300)
    done = subprocess.run(argv, cwd=base, capture_output=True, text=True, env=env, timeout=900)
    again = subprocess.run(argv, cwd=base, capture_output=True, text=True, env=env, timeout=300)
    return SimpleNamespace(base=base, out=out, flags=flags, argv=argv, dry=dry, done=done, again=again, env=env)


def test_run_experiments_runs_resumes_and_skips(experiment):
    dry, done, again = experiment.dry, experiment.done, experiment.again
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.strip().splitlines()
    assert len(commands) == 4 and all(c.endswith("--resume auto") for c in commands)
    assert "--tag t@none@seed0" in commands[0] and all("--seed 1" in c for c in commands[1::2])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/4] t@none@seed0" in done.stdout and "resuming" in done.stdout and "[4/4] t@ctopk_w@seed1" in done.stdout
    for tag in ("t@none@seed0", "t@none@seed1", "t@ctopk_w@seed0", "t@ctopk_w@seed1"):
        history = json.loads((experiment.out / "data" / f"{tag}.json").read_text())
        assert history["finished_iteration"] == 2 and history["config"]["seed"] == int(tag[-1])
    resumed = json.loads((experiment.out / "data" / "t@none@seed0.json").read_text())
    assert [r["iteration"] for r in resumed["resumes"]] == [1]
    assert again.returncode == 0 and again.stdout.count("skipped") == 4, again.stdout


def test_saved_scores_reproduce_the_logged_best_map(experiment):
    for tag in ("t@none@seed1", "t@ctopk_w@seed0"):
        history = json.loads((experiment.out / "data" / f"{tag}.json").read_text())
        best = max(history["validation"], key=lambda r: r["mAP"])
        with np.load(experiment.out / "data" / f"{tag}_val_scores.npz") as saved:
            assert saved["scores"].shape == (12, 20) and len(saved["image_ids"]) == 12
            assert saved["image_ids"][0].startswith("demo_")
            m_ref, _ = mean_average_precision(saved["scores"], saved["labels"])
            m_voc, _ = mean_average_precision(saved["scores"], saved["labels"], ignore=saved["ignore"], kind="voc")
            assert int(saved["iteration"]) == best["iteration"]
        assert m_ref == pytest.approx(best["mAP"], abs=1e-9) and m_voc == pytest.approx(best["mAP_voc"], abs=1e-9)


def test_run_experiments_bad_input(experiment, tmp_path, capsys):
    cases = [
        (["--scripts", "nope.py", "--seeds", "0", "--demo"], "nope.py"),
        (["--scripts", PLAIN, "--seeds", "0", "--demo", "--tag", "x"], "--tag"),
        (["--scripts", PLAIN, "--seeds", "0", "0", "--demo"], "twice"),
        (["--scripts", PLAIN, "--seeds", "0", "--demo", "--lr", "-1"], "--lr"),
        # a finished run of the same tags with another recipe is not skipped silently
        (["--scripts", PLAIN, "--seeds", "1", "--prefix", "t", *experiment.flags[:-2], "--lr", "0.05",
          "--output_dir", str(experiment.out)], "another recipe"),
    ]
    for argv, words in cases:
        code, _, err = call(run_experiments.main, argv, capsys)
        assert words in one_error_line(code, err), argv


# ----------------------------------------------------------------------------- compare_experiments: groups
def slow_bootstrap(group: list[np.ndarray], baseline: list[np.ndarray], labels: np.ndarray, resamples: int,
                   seed: int) -> tuple[float, float, float, float]:
    """The paired bootstrap written out per resample, from tools.metrics' AP (the oracle)."""
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(resamples):
        rows = rng.integers(0, len(labels), size=len(labels))
        mean = [np.mean([mean_average_precision(s[rows], labels[rows])[0] for s in runs]) for runs in (group, baseline)]
        deltas.append(mean[0] - mean[1])
    full = [np.mean([mean_average_precision(s, labels)[0] for s in runs]) for runs in (group, baseline)]
    low, high = np.percentile(deltas, [2.5, 97.5])
    return full[0] - full[1], low, high, float(np.mean(np.array(deltas) > 0))


def test_bootstrap_equals_a_per_resample_loop():
    rng = np.random.default_rng(5)
    labels = (rng.random((40, 6)) < 0.3).astype(float)
    labels[0] = 1
    group = [labels + rng.normal(0, s, labels.shape) for s in (0.6, 0.8)]
    baseline = [labels + rng.normal(0, 1.2, labels.shape) for _ in range(3)]
    indices = resample_indices(40, 300, seed=11)
    result = paired_bootstrap([mean_average_precision(s, labels)[0] for s in group],
                              [run_maps(s, labels, indices) for s in group],
                              [mean_average_precision(s, labels)[0] for s in baseline],
                              [run_maps(s, labels, indices) for s in baseline])
    expected = slow_bootstrap(group, baseline, labels, 300, 11)
    assert (result.delta, result.low, result.high, result.share_above_zero) == pytest.approx(expected, abs=1e-9)
    assert result.low < result.delta < result.high and result.delta > 0


def test_compare_groups_with_intervals(experiment, capsys, tmp_path):
    code, out, err = call(compare_experiments.main, ["--dir", experiment.out, "--baseline", "none", "--format", "csv",
                                                     "--resamples", "200"], capsys)
    assert code == 0, err
    import csv

    rows = {r["group"]: r for r in csv.DictReader(out.strip().splitlines())}
    assert list(rows) == ["none", "ctopk_w"] and rows["ctopk_w"]["runs"] == "2" and rows["ctopk_w"]["seeds"] == "0 1"
    best = {}
    for group in ("none", "ctopk_w"):
        scores = []
        for seed in (0, 1):
            tag = f"t@{group}@seed{seed}"
            history = json.loads((experiment.out / "data" / f"{tag}.json").read_text())
            best.setdefault(group, []).append(max(r["mAP"] for r in history["validation"]))
            with np.load(experiment.out / "data" / f"{tag}_val_scores.npz") as saved:
                scores.append(saved["scores"].astype(float))
                labels = saved["labels"].astype(float)
        best[group + "_scores"] = scores
    assert float(rows["ctopk_w"]["mAP_mean"]) == pytest.approx(np.mean(best["ctopk_w"]))
    assert float(rows["ctopk_w"]["mAP_std"]) == pytest.approx(np.std(best["ctopk_w"], ddof=1))
    delta, low, high, share = slow_bootstrap(best["ctopk_w_scores"], best["none_scores"], labels, 200, 0)
    assert float(rows["ctopk_w"]["delta_vs_none"]) == pytest.approx(delta, abs=1e-9)
    assert (float(rows["ctopk_w"]["ci_low_vs_none"]), float(rows["ctopk_w"]["ci_high_vs_none"])) == \
        pytest.approx((low, high), abs=1e-9)
    assert float(rows["ctopk_w"]["share_above_0_vs_none"]) == pytest.approx(share)
    assert rows["none"]["delta_vs_none"] == ""
    for group in ("none", "ctopk_w"):  # tied scores: each (image, class) score shared with another image's
        shares = [100 * np.mean([[np.sum(s[:, c] == s[i, c]) > 1 for c in range(s.shape[1])] for i in range(len(s))])
                  for s in best[group + "_scores"]]
        assert float(rows[group]["tied_scores_mean"]) == pytest.approx(np.mean(shares), abs=1e-9)

    code, out, err = call(compare_experiments.main, ["--dir", experiment.out, "--baseline", "none"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("| group | runs | best mAP") and "ΔmAP vs none [95% CI]" in lines[0]
    assert lines[3].startswith("| ctopk_w | 2 |") and "paired bootstrap over the 12 validation images" in out


def test_compare_groups_bad_input_and_older_runs(experiment, tmp_path, capsys):
    import shutil

    folder = Path(shutil.copytree(experiment.out / "data", tmp_path / "exp" / "data"))
    code, _, err = call(compare_experiments.main, ["--dir", folder.parent, "--baseline", "puzzle"], capsys)
    assert "--baseline puzzle names no group here; the groups are: none, ctopk_w" in one_error_line(code, err)
    compare = ["--dir", folder.parent, "--baseline", "none", "--format", "csv", "--resamples", "100"]
    scores = folder / "t@ctopk_w@seed1_val_scores.npz"
    with np.load(scores) as saved:
        kept = dict(saved)

    def refused(**changed) -> str:
        np.savez(scores, **{**kept, **changed})
        code, out, err = call(compare_experiments.main, compare, capsys)
        assert not out
        return one_error_line(code, err)

    assert "does not match its history (19 classes where the history has 20)" in refused(
        scores=kept["scores"][:, :19], labels=kept["labels"][:, :19], ignore=kept["ignore"][:, :19])
    assert "where the history's best validation has" in refused(mAP=np.asarray(kept["mAP"] + 1.0))
    other_ids = kept["image_ids"].copy()
    other_ids[0] = "someone_else"
    assert "t@ctopk_w@seed1 was validated on other validation images than t@none@seed0" in refused(
        image_ids=other_ids)
    flipped = kept["labels"].copy()
    flipped[0] = 1 - flipped[0]
    assert "validated on other labels" in refused(labels=flipped)
    scores.write_bytes(b"not an npz")
    code, _, err = call(compare_experiments.main, compare, capsys)
    assert "is not a per-image score file" in one_error_line(code, err)
    scores.unlink()  # an older run: no per-image scores, so no interval that covers the whole group
    code, _, err = call(compare_experiments.main, compare, capsys)
    assert "t@ctopk_w@seed1: no per-image scores" in one_error_line(code, err)
    code, _, err = call(compare_experiments.main, ["--dir", folder.parent, "--format", "csv"], capsys)
    assert code == 0, err  # without --baseline the scores are not read
    history = json.loads((folder / "t@ctopk_w@seed1.json").read_text())
    history["config"]["lr"] = 0.5
    (folder / "t@ctopk_w@seed1.json").write_text(json.dumps(history))
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent], capsys)
    line = one_error_line(code, err)
    assert "group ctopk_w mixes recipes" in line and "--lr" in line and not out


def copy_run(folder: Path, tag: str, new_tag: str, **changes) -> dict:
    """A copy of run `tag`'s history (and per-image scores) under `new_tag`, with `changes` to its top level."""
    history = json.loads((folder / f"{tag}.json").read_text())
    history["config"]["tag"] = new_tag
    history.update(changes)
    (folder / f"{new_tag}.json").write_text(json.dumps(history))
    (folder / f"{new_tag}_val_scores.npz").write_bytes((folder / f"{tag}_val_scores.npz").read_bytes())
    return history


def test_compare_refuses_mixed_lengths_and_repeated_seeds(experiment, tmp_path, capsys):
    """Free on --resume, --max_iterations still makes another result; and one seed twice is not a spread."""
    import shutil

    folder = Path(shutil.copytree(experiment.out / "data", tmp_path / "exp" / "data"))
    # a longer run of the same recipe, seed 2: continued with a larger --max_iterations
    longer = copy_run(folder, "t@ctopk_w@seed1", "u@ctopk_w@seed2", finished_iteration=3)
    longer["config"]["seed"] = 2
    longer["validation"][-1]["iteration"] = 3
    (folder / "u@ctopk_w@seed2.json").write_text(json.dumps(longer))
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent, "--baseline", "none"], capsys)
    line = one_error_line(code, err)
    assert not out and line.startswith("error: group ctopk_w mixes run lengths: t@ctopk_w@seed0 and t@ctopk_w@seed1 "
                                       "at iteration 2; u@ctopk_w@seed2 at iteration 3")
    assert "--filter TEXT" in line
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent, "--filter", "t@"], capsys)
    assert code == 0 and "| ctopk_w | 2 |" in out, err
    code, out, _ = call(compare_experiments.main, ["--dir", folder.parent, "--runs"], capsys)
    assert code == 0 and "u@ctopk_w@seed2" in out  # one row per run: nothing is averaged, nothing to refuse
    (folder / "u@ctopk_w@seed2.json").unlink()

    # a run stopped (or still going) without finished_iteration: its last recorded iteration is its length
    unfinished = json.loads((folder / "t@ctopk_w@seed0.json").read_text())
    del unfinished["finished_iteration"]
    (folder / "t@ctopk_w@seed0.json").write_text(json.dumps(unfinished))
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent], capsys)
    assert code == 0 and "| ctopk_w | 2 |" in out, err
    unfinished["validation"], unfinished["train"] = unfinished["validation"][:0], unfinished["train"][:1]
    unfinished["train"][0]["iteration"] = 1
    (folder / "t@ctopk_w@seed0.json").write_text(json.dumps(unfinished))
    code, _, err = call(compare_experiments.main, ["--dir", folder.parent], capsys)
    assert "t@ctopk_w@seed0 at iteration 1; t@ctopk_w@seed1 at iteration 2" in one_error_line(code, err)
    (folder / "t@ctopk_w@seed0.json").unlink()

    # the same seed under two tags (two demo runs of seed 0, say)
    copy_run(folder, "t@none@seed0", "again@none@seed0")
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent, "--baseline", "none"], capsys)
    line = one_error_line(code, err)
    assert not out and line.startswith("error: group none holds a seed twice: seed 0 in again@none@seed0 and "
                                       "t@none@seed0")
    assert "--filter TEXT" in line
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent, "--filter", "t@"], capsys)
    assert code == 0 and "| none | 2 |" in out, err


def test_run_experiments_help_says_unknown_flags_go_to_every_run(capsys):
    code, out, _ = call(run_experiments.main, ["--help"], capsys)
    assert code == 0 and "Every flag not listed below is passed to every run unchanged" in out
    example = next(line.split() for line in out.splitlines() if line.strip().startswith("python run_experiments.py"))
    args, passed = run_experiments.build_parser().parse_known_args(example[2:])
    assert args.seeds == [0, 1] and passed == ["--demo", "--max_iterations", "20"]
    assert parse_args({}, passed).max_iterations == 20


# ----------------------------------------------------------------------------- the guard against exploding steps
def test_clip_grad_norm_bounds_the_step_and_is_off_by_default(monkeypatch):
    from core.runtime import Runtime
    from core.step import build_step, train_step

    args = parse_args({"strategy": "ctopk_w", "head": "csi"}, [
        "--demo", "--pretrained", "none", "--image_size", "64", "--batch_size", "4", "--reference_gpus", "1",
        "--min_distance", "3", "--device", "cpu"])
    assert args.clip_grad_norm == 0  # the reference clips nothing
    norms = {}
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    labels = torch.zeros(4, 20)
    labels[[0, 1, 2, 3, 3], [0, 5, 7, 7, 12]] = 1
    for clip in (0.0, 1e-3):
        args = args.replace(clip_grad_norm=clip)
        torch.manual_seed(0)
        ctx = build_step(args, Runtime(torch.device("cpu")))
        original = ctx.optimizer.step

        def step(*a, _ctx=ctx, _clip=clip, _original=original, **k):
            grads = [p.grad for p in _ctx.bare_student.parameters() if p.grad is not None]
            norms[_clip] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            return _original(*a, **k)

        monkeypatch.setattr(ctx.optimizer, "step", step)
        train_step(ctx, [(images, labels)], 0, 10)
    assert norms[0.0] > 1e-2 and norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
