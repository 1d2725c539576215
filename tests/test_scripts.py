"""Smoke runs of every training script on a tiny generated VOC-format set, through the real CLI."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "train_classification.py": "none",
    "train_classification_with_puzzle.py": "puzzle",
    "train_classification_with_puzzle_max.py": "max",
    "train_classification_with_puzzle_cMax_ema.py": "cmax",
    "train_classification_with_puzzle_cTopk_ema.py": "ctopk",
    "train_classification_with_puzzle_cTopk_w_ema.py": "ctopk_w",
}
TINY = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "normal",
        "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
        "--batch_size", "4", "--num_workers", "0", "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8"]


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_smoke_run(script, tiny_voc, tmp_path):
    tag = f"smoke_{SCRIPTS[script]}"
    out = run_script(script, "--data_dir", str(tiny_voc), *TINY, "--max_iterations", "3", "--tag", tag,
                     "--output_dir", str(tmp_path / "exp"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    exp = tmp_path / "exp"
    log = (exp / "logs" / f"{tag}.txt").read_text()
    assert log.startswith("# config") and f"strategy: {SCRIPTS[script]}" in log and "chance level" in log
    history = json.loads((exp / "data" / f"{tag}.json").read_text())
    assert history["config"]["strategy"] == SCRIPTS[script]
    assert history["train"] and history["validation"]
    for row in history["train"]:
        assert {"iteration", "lr", "loss", "class_loss", "p_class_loss", "re_loss", "alpha_re"} <= set(row)
        assert all(math.isfinite(row[k]) for k in ("loss", "class_loss", "p_class_loss", "re_loss"))
    last = history["validation"][-1]
    assert last["iteration"] == 3 and 0 <= last["mAP"] <= 100 and 0 <= last["mAP_voc"] <= 100
    assert math.isfinite(last["eval_class_loss"]) and last["eval_class_loss"] > 0
    assert history["config"]["head"] == ("csi" if SCRIPTS[script] not in ("none", "puzzle") else "gap")
    assert last["best_mAP"] == max(v["mAP"] for v in history["validation"])
    puzzle = SCRIPTS[script] != "none"
    assert (history["train"][-1]["tasks_per_batch"] > 0) == puzzle
    assert ("mAP_teacher" in last) == SCRIPTS[script].startswith("c")
    # every script logs where its CAMs point (pointing game, each strategy's keypoint hit rate and box distance)
    for record in history["validation"]:
        assert 0 <= record["pointing_game"] <= 100
        for strategy in ("max", "cmax", "ctopk", "ctopk_w"):
            assert 0 <= record[f"hit_rate_{strategy}"] <= 100 and record[f"box_distance_{strategy}"] >= 0
    assert "hits: pointing" in log
    for which in ("best", "last"):
        ckpt = torch.load(exp / "models" / f"{tag}_{which}.pth", weights_only=False)
        assert {"model", "config", "epoch"} <= set(ckpt)
        assert ckpt["config"]["strategy"] == SCRIPTS[script]


def test_wrong_data_dir_is_one_line_and_exit_2(tmp_path):
    out = run_script("train_classification_with_puzzle_max.py", "--data_dir", str(tmp_path / "nowhere"),
                     "--num_workers", "0", cwd=tmp_path)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "nowhere" in out.stderr


@pytest.mark.parametrize("flags,words", [
    (["--k", "0"], "--k"),
    (["--min_distance", "-1"], "--min_distance"),
    (["--alpha_ema", "1.0"], "--alpha_ema"),
    (["--image_size", "100"], "multiple of 16"),
    (["--batch_size", "0"], "--batch_size"),
    (["--max_epoch", "0"], "--max_epoch"),
    (["--alpha_re", "-1"], "must not be negative"),
    (["--alpha_p", "-0.5"], "must not be negative"),
    (["--accum_steps", "0"], "--accum_steps"),
    (["--amp", "fp16", "--device", "cpu"], "--amp fp16"),
    (["--batch_size", "6", "--accum_steps", "4", "--reference_gpus", "1"], "not divisible"),
    (["--head", "mlp"], "--head"),
    (["--keypoint_rule", "fancy"], "--keypoint_rule"),
    (["--reference_gpus", "0"], "--reference_gpus"),
    (["--reference_gpus", "3"], "--reference_gpus"),
    (["--batch_size", "12", "--accum_steps", "3"], "whole BatchNorm chunks"),
    (["--warmup_epoch", "-1"], "--warmup_epoch"),
    (["--augment", "mixup"], "--augment"),
    (["--alpha_schedule_re", "-0.1"], "--alpha_schedule_re"),
    (["--train_split", "nosuchsplit"], "nosuchsplit"),
    (["--architecture", "vgg16"], "vgg16"),
])
def test_bad_flags_are_one_line_and_exit_2(flags, words, tiny_voc, tmp_path, monkeypatch, capsys):
    """In-process (the CLI path without a new interpreter per case): SystemExit(2) and one stderr line."""
    import train_classification_with_puzzle_cTopk_w_ema as script
    from core.trainer import main

    argv = ["--data_dir", str(tiny_voc), *TINY, *flags, "--output_dir", str(tmp_path / "exp")]
    monkeypatch.setattr(sys, "argv", ["train_classification_with_puzzle_cTopk_w_ema.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main(script.DEFAULTS)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert not (tmp_path / "exp").exists()  # nothing written for a rejected command
