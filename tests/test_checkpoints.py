"""Checkpoints you can trust: safe loading, resumes that cannot mix recipes, provenance (issue #10).

One 3-iteration run of the cTopk-w script (a subprocess) is shared by the module; every resume and
tool runs in-process on a copy of its outputs, through the scripts' own entry points.
"""
import hashlib
import importlib
import io
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tool_calls import call

import compare_experiments
import evaluate_classification
import infer
import visualize_cams
from core.recipe import FREE_FLAGS, RUN_DEFINING_FLAGS, recipe_changes
from core.runtime import rng_states, set_rng_states
from core.trainer import main as train_main
from tools.checkpoint import load_checkpoint, plain_rng_states, raw_rng_states, save_checkpoint
from tools.errors import UserError
from tools.files import file_sha256

ROOT = Path(__file__).resolve().parents[1]
CTOPK_W = "train_classification_with_puzzle_cTopk_w_ema"
FLAGS = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "normal",
         "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
         "--batch_size", "4", "--num_workers", "0", "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8",
         "--max_epoch", "2", "--tag", "base"]  # 16 images: 4 iterations per epoch, 8 in all
PRINTED_REFUSAL = "needs arbitrary code to load"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_own_signals():
    """One compute thread (shared 2-core machine); the in-process trainer's signal handlers undone."""
    threads, handlers = torch.get_num_threads(), {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope="module")
def base(tiny_voc, tmp_path_factory) -> SimpleNamespace:
    exp = tmp_path_factory.mktemp("ckpt") / "exp"
    out = subprocess.run([sys.executable, str(ROOT / f"{CTOPK_W}.py"), "--data_dir", str(tiny_voc), *FLAGS,
                          "--output_dir", str(exp), "--max_iterations", "3"],
                         capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(exp=exp, voc=tiny_voc)


@pytest.fixture
def exp(base, tmp_path) -> Path:
    """A private copy of the base run's outputs."""
    return Path(shutil.copytree(base.exp, tmp_path / "exp"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}



def resume(script: str, exp: Path, voc: Path, capsys, monkeypatch, *extra: str) -> tuple[int, str]:
    """Resume --tag base in this process with `script`'s entry point; (exit code, stderr)."""
    argv = ["--data_dir", voc, *FLAGS, "--output_dir", exp, "--resume", *extra]
    monkeypatch.setattr(sys, "argv", [str(ROOT / f"{script}.py"), *map(str, argv)])
    code = 0
    try:
        train_main(importlib.import_module(script).DEFAULTS)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def error_line(code: int, err: str) -> str:
    """The one stderr line of a refusal (progress bars never come before a resume check)."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- safe form
def test_a_fresh_checkpoint_loads_with_weights_only(base):
    for which in ("best", "last"):
        ckpt = torch.load(base.exp / "models" / f"base_{which}.pth", map_location="cpu", weights_only=True)
        assert ckpt["iteration"] == 3 and ckpt["script"] == f"{CTOPK_W}.py" and ckpt["config"]["batch_size"] == 4
        assert isinstance(ckpt["rng"]["python"]["internal"], list) and ckpt["rng"]["torch"].dtype == torch.uint8
        assert isinstance(ckpt["rng"]["numpy"]["keys"], torch.Tensor) and type(ckpt["best_mAP"]) is float


def test_rng_states_survive_the_plain_form():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    raw = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    plain = plain_rng_states(raw)
    assert raw_rng_states(plain)["python"] == raw["python"]
    buffer = io.BytesIO()
    torch.save(rng_states(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["python"]["internal"] == list(random.getstate()[1])
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    set_rng_states(plain)
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


# ----------------------------------------------------------------------------- refusing code
class MakesAFile:
    """Unpickling this creates `path` (no shell involved): the proof that a load ran a pickle's code."""

    def __init__(self, path: Path) -> None:
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def crafted_checkpoint(source: Path, path: Path, marker: Path) -> Path:
    """A real checkpoint of the run with a payload that would create `marker` when unpickled."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    ckpt["payload"] = MakesAFile(marker)
    torch.save(ckpt, path)
    return path


def test_the_payload_is_real(base, tmp_path):
    """Loading the crafted file the unsafe way does create the file: the refusals below mean something."""
    marker = tmp_path / "ran"
    path = crafted_checkpoint(base.exp / "models" / "base_best.pth", tmp_path / "evil.pth", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_every_tool_refuses_a_checkpoint_that_runs_code(base, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(base.exp / "models" / "base_best.pth", tmp_path / "shared.pth", marker)
    image = sorted((base.voc / "JPEGImages").glob("*.jpg"))[0]
    runs = {"evaluate": (evaluate_classification.main, ["--checkpoint", evil, "--output_dir", tmp_path / "out"]),
            "infer": (infer.main, [image, "--checkpoint", evil, "--save_cam", tmp_path / "cams"]),
            "visualize": (visualize_cams.main, ["--checkpoint", evil, "--out", tmp_path / "figs"])}
    for name, (main, argv) in runs.items():
        code, out, err = call(main, argv, capsys)
        line = error_line(code, err)
        assert f"{evil} {PRINTED_REFUSAL}" in line and "it calls getattr" in line, name
        assert "The training scripts write tensors and plain values only" in line, name
        assert not marker.exists() and not out, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.pth"]  # no output of any tool


def test_resume_refuses_a_checkpoint_that_runs_code(exp, base, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    last = exp / "models" / "base_last.pth"
    crafted_checkpoint(last, last, marker)
    before = snapshot(exp)
    code, err = resume(CTOPK_W, exp, base.voc, capsys, monkeypatch, "--max_iterations", "4")
    assert PRINTED_REFUSAL in error_line(code, err)
    assert not marker.exists() and snapshot(exp) == before


def test_a_damaged_file_is_one_line_too(tmp_path):
    path = tmp_path / "half.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="half.pth is not a readable checkpoint"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------- resumes
@pytest.mark.parametrize("script, extra, words", [
    (CTOPK_W, ["--batch_size", "8"], ["--batch_size 4 → 8"]),
    ("train_classification_with_puzzle_max", [], [f"script {CTOPK_W}.py → train_classification_with_puzzle_max.py",
                                                   "--strategy ctopk_w → max"]),
    (CTOPK_W, ["--max_epoch", "3"], ["--max_epoch 2 → 3", "poly"]),
    (CTOPK_W, ["--amp", "bf16", "--lr", "0.02"], ["--amp off → bf16", "--lr 0.01 → 0.02"]),
    (CTOPK_W, ["--max_iterations", "2"], ["--max_iterations 2 is before the checkpoint's iteration 3", "to 8"]),
], ids=["batch_size", "other_script", "max_epoch", "two_flags", "max_iterations_back"])
def test_resume_refuses_another_recipe(exp, base, capsys, monkeypatch, script, extra, words):
    before = snapshot(exp)
    code, err = resume(script, exp, base.voc, capsys, monkeypatch, *extra)
    line = error_line(code, err)
    assert all(w in line for w in words), line
    assert "before the checkpoint" in line or ("pass the saved values" in line and "new --tag" in line), line
    assert snapshot(exp) == before  # nothing saved was touched


def test_resume_allows_a_longer_stop_and_other_workers(exp, base, capsys, monkeypatch):
    saved = sha256(exp / "models" / "base_last.pth")
    code, err = resume(CTOPK_W, exp, base.voc, capsys, monkeypatch, "--max_iterations", "4", "--num_workers", "1")
    assert code == 0, err[-2000:]
    last = torch.load(exp / "models" / "base_last.pth", map_location="cpu", weights_only=True)
    assert last["iteration"] == 4
    history = json.loads((exp / "data" / "base.json").read_text())
    assert history["resumes"] == [{"iteration": 3, "checkpoint_sha256": saved,
                                   "changed": {"num_workers": [0, 1], "max_iterations": [3, 4]}}]
    assert f"sha256 {saved}; num_workers 0 → 1" in (exp / "logs" / "base.txt").read_text()
    check_hashes(exp)


@pytest.mark.parametrize("script, extra, words", [
    (CTOPK_W, ["--batch_size", "8"], ["--batch_size 4 → 8"]),
    ("train_classification_with_puzzle_max", [], [f"script {CTOPK_W}.py → train_classification_with_puzzle_max.py"]),
], ids=["recipe", "script"])
def test_resume_auto_keeps_the_recipe_guards(exp, base, capsys, monkeypatch, script, extra, words):
    before = snapshot(exp)
    code, err = resume(script, exp, base.voc, capsys, monkeypatch, "auto", *extra)
    line = error_line(code, err)
    assert all(w in line for w in words) and "pass the saved values" in line, line
    assert snapshot(exp) == before


def test_resume_auto_refuses_a_best_checkpoint_without_its_last(exp, base, capsys, monkeypatch):
    (exp / "models" / "base_last.pth").unlink()
    before = snapshot(exp)
    line = error_line(*resume(CTOPK_W, exp, base.voc, capsys, monkeypatch, "auto", "--max_iterations", "4"))
    assert "base_best.pth exists but" in line and "--overwrite" in line, line
    assert snapshot(exp) == before


def test_resume_auto_continues_and_free_flags_accept_auto(exp, base, capsys, monkeypatch):
    code, err = resume(CTOPK_W, exp, base.voc, capsys, monkeypatch, "auto", "--max_iterations", "4",
                       "--num_workers", "auto")
    assert code == 0, err[-2000:]
    assert torch.load(exp / "models" / "base_last.pth", weights_only=True)["iteration"] == 4
    history = json.loads((exp / "data" / "base.json").read_text())
    assert history["resumes"][-1]["changed"] == {"num_workers": [0, "auto"], "max_iterations": [3, 4]}
    assert history["config"]["resume"] is True  # configs keep recording a bool


def test_resume_auto_starts_over_when_no_checkpoint_was_saved(exp, base, capsys, monkeypatch):
    for which in ("best", "last"):
        (exp / "models" / f"base_{which}.pth").unlink()  # killed before its first save: a log and a history
    code, err = resume(CTOPK_W, exp, base.voc, capsys, monkeypatch, "auto", "--max_iterations", "1")
    assert code == 0, err[-2000:]
    log = (exp / "logs" / "base.txt").read_text()
    assert "# --resume auto: no checkpoint of --tag base" in log and "started over" in log
    assert log.startswith("# config") and "resumed from" not in log
    assert torch.load(exp / "models" / "base_last.pth", weights_only=True)["iteration"] == 1


def test_flag_lists_and_missing_flags():
    assert not set(RUN_DEFINING_FLAGS) & set(FREE_FLAGS)
    saved = {"batch_size": 4, "lr": 0.1, "removed_flag": 1}
    current = {"batch_size": 4, "lr": 0.1, "num_workers": 8, "augment": "randaugment", "new_flag": 2}
    # a flag the checkpoint lacks counts as its default; one the code lacks is skipped
    assert recipe_changes(saved, current, {"augment": "none", "new_flag": 2}) == [("augment", "none", "randaugment")]
    assert recipe_changes(saved, current, {}) == []


# ----------------------------------------------------------------------------- provenance
def check_hashes(exp: Path) -> None:
    history = json.loads((exp / "data" / "base.json").read_text())
    files = {w: sha256(exp / "models" / f"base_{w}.pth") for w in ("best", "last")}
    assert history["checkpoint_sha256"] == files
    assert history["validation"][-1]["checkpoints"]["last"] == files["last"]
    best = max(history["validation"], key=lambda r: r["mAP"])
    assert best["checkpoints"]["best"] == files["best"]


def test_history_records_the_hash_of_every_checkpoint_file(base):
    check_hashes(base.exp)
    assert file_sha256(base.exp / "models" / "base_best.pth") == sha256(base.exp / "models" / "base_best.pth")


def test_history_records_where_it_ran(base):
    """The fixture's run had OMP_NUM_THREADS=1: its history says so, with this torch and this CPU."""
    (session,) = json.loads((base.exp / "data" / "base.json").read_text())["environment"]
    assert session["cpu_threads"] == 1 and session["torch"] == torch.__version__ and session["device"] == "cpu"
    assert session["world_size"] == 1 and session["device_name"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert session["code"] is None if not head else session["code"].split("+")[0] == head


def test_tools_print_and_store_the_checkpoint_hash_and_config(base, tmp_path, capsys):
    best = base.exp / "models" / "base_best.pth"
    config = torch.load(best, weights_only=True)["config"]
    code, out, err = call(evaluate_classification.main, ["--tag", "base", "--output_dir", base.exp], capsys)
    assert code == 0, err
    assert out.startswith(f"# checkpoint {best} sha256 {sha256(best)}")
    assert "# trained with: " + f"{CTOPK_W}.py strategy=ctopk_w architecture=resnet18" in out
    result = json.loads((base.exp / "data" / "base_eval_main_val.json").read_text())
    assert result["checkpoint_sha256"] == sha256(best) and result["config"] == config

    image = sorted((base.voc / "JPEGImages").glob("*.jpg"))[0]
    code, out, err = call(infer.main, [image, "--tag", "base", "--output_dir", base.exp, "--save_cam", tmp_path],
                          capsys)
    assert code == 0 and f"sha256 {sha256(best)}" in out.splitlines()[0], err
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["checkpoint_sha256"] == sha256(best) and saved["config"] == config
    assert [entry["image"] for entry in saved["images"]] == [str(image)]

    code, out, err = call(compare_experiments.main, ["--dir", base.exp, "--runs"], capsys)
    assert code == 0 and out.splitlines()[2].endswith(f"| {sha256(best)[:12]} |"), err
