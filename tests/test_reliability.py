"""Resume, atomic writes, signals and the refusal to overwrite a run."""
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools.checkpoint import save_checkpoint, write_json
from tools.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_classification_with_puzzle_cTopk_w_ema.py")
FLAGS = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "normal",
         "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
         "--batch_size", "4", "--num_workers", "0", "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8",
         "--max_epoch", "2"]


def command(tiny_voc: Path, out: Path, tag: str, *extra: str) -> list[str]:
    return [sys.executable, SCRIPT, "--data_dir", str(tiny_voc), *FLAGS, "--output_dir", str(out), "--tag", tag, *extra]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before writing a checkpoint"
        assert time.time() - start < timeout
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(tiny_voc, tmp_path_factory) -> dict:
    """The uninterrupted run's last checkpoint, which every interrupted-and-resumed run must equal bitwise."""
    out = tmp_path_factory.mktemp("straight")
    res = run(command(tiny_voc, out, "straight"))
    assert res.returncode == 0, res.stderr[-2000:]
    return load(out / "models" / "straight_last.pth")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"] == 8
    for part in ("model", "teacher"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [v["mAP"] for v in a["history"]["validation"]] == [v["mAP"] for v in b["history"]["validation"]]


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tiny_voc, tmp_path, straight):
    out = tmp_path / "exp"

    proc = subprocess.Popen(command(tiny_voc, out, "killed", "--save_every", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = out / "models" / "killed_last.pth"
    wait_for(last, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load(last)["iteration"]
    assert 1 <= killed_at < 8  # killed mid-run: 2 epochs x 4 iterations

    resumed = run(command(tiny_voc, out, "killed", "--save_every", "1", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_bitwise_equal(straight, load(last))
    log = (out / "logs" / "killed.txt").read_text()
    assert f"resumed from {last} at iteration {killed_at}" in log


def test_sigterm_saves_says_where_and_exits(tiny_voc, tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.Popen(command(tiny_voc, out, "term", "--save_every", "1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = out / "models" / "term_last.pth"
    wait_for(last, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    log = (out / "logs" / "term.txt").read_text()
    assert f"saved {last}" in log and "--resume" in log
    assert load(last)["iteration"] < 8


def test_sigterm_then_the_same_command_with_resume_auto_is_bitwise_equal(tiny_voc, tmp_path, straight):
    """A requeued job runs its command line unchanged: --resume auto starts fresh, then continues."""
    out = tmp_path / "exp"
    cmd = command(tiny_voc, out, "requeued", "--save_every", "1", "--resume", "auto")
    last = out / "models" / "requeued_last.pth"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(last, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
    stopped_at = load(last)["iteration"]
    assert 1 <= stopped_at < 8

    again = run(cmd)
    assert again.returncode == 0, again.stderr[-2000:]
    assert_bitwise_equal(straight, load(last))
    log = (out / "logs" / "requeued.txt").read_text()
    assert f"exit code {128 + signal.SIGTERM}" in log and f"resumed from {last} at iteration {stopped_at}" in log


def test_sigusr1_saves_and_exits_with_its_own_code(tiny_voc, tmp_path):
    out = tmp_path / "exp"
    proc = subprocess.Popen(command(tiny_voc, out, "usr1", "--save_every", "1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    last = out / "models" / "usr1_last.pth"
    wait_for(last, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGUSR1 == 138 and "Traceback" not in err
    assert f"stopped by signal {int(signal.SIGUSR1)}" in (out / "logs" / "usr1.txt").read_text()


def test_existing_tag_is_refused_then_overwrite_and_resume_work(tiny_voc, tmp_path):
    out = tmp_path / "exp"
    first = run(command(tiny_voc, out, "again", "--max_iterations", "1"))
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "models" / "again_last.pth").read_bytes()
    refused = run(command(tiny_voc, out, "again", "--max_iterations", "1"))
    assert refused.returncode == 2
    line = refused.stderr.strip()
    assert "\n" not in line and "--resume" in line and "--overwrite" in line
    assert (out / "models" / "again_last.pth").read_bytes() == before  # nothing lost
    assert run(command(tiny_voc, out, "again", "--max_iterations", "2", "--resume")).returncode == 0
    assert load(out / "models" / "again_last.pth")["iteration"] == 2
    assert run(command(tiny_voc, out, "again", "--max_iterations", "1", "--overwrite")).returncode == 0
    assert load(out / "models" / "again_last.pth")["iteration"] == 1


def test_resume_without_checkpoint_and_unwritable_output_are_one_line(tiny_voc, tmp_path):
    res = run(command(tiny_voc, tmp_path / "exp", "ghost", "--resume"))
    assert res.returncode == 2 and "no checkpoint" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    res = run(command(tiny_voc, blocker / "exp", "x"))
    assert res.returncode == 2 and "--output_dir" in res.stderr and "Traceback" not in res.stderr


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_voc, tmp_path):
    out = tmp_path / "exp"
    res = run(command(tiny_voc, out, "boom", "--lr", "1e12", "--save_every", "1"))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "non-finite" in res.stderr and "iteration" in res.stderr and "Traceback" not in res.stderr
    # progress bars may come first; the error itself is one line, the last one
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite")
    last = out / "models" / "boom_last.pth"
    if last.exists():  # whatever was saved holds finite weights only, and the message names it
        assert all(torch.isfinite(v.float()).all() for v in load(last)["model"].values())
        assert f"{last} keeps the last good state (iteration {load(last)['iteration']})" in line
    else:
        assert "no checkpoint was written yet" in line and "_last.pth" not in line


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("nan_from,save_every", [(1, 0), (3, 2)], ids=["before_the_first_save", "after_it"])
def test_divergence_names_its_iteration_and_only_a_checkpoint_that_exists(nan_from, save_every, tiny_voc, tmp_path,
                                                                        monkeypatch, capsys):
    """The losses turn non-finite from iteration `nan_from` (counted like the logs, 1-based); the run reads them
    at its log line of iteration 4 (print_ratio 1: once per 4-iteration epoch) or at a save."""
    import core.trainer
    from core.config import parse_args
    from core.trainer import train
    from tools.errors import run_cli

    real_step = core.trainer.train_step

    def diverging_step(ctx, micro_batches, iteration, total):
        stats = real_step(ctx, micro_batches, iteration, total)
        return stats.with_values(stats.values * float("nan")) if iteration + 1 >= nan_from else stats

    monkeypatch.setattr(core.trainer, "train_step", diverging_step)
    out = tmp_path / "exp"
    argv = ["--data_dir", str(tiny_voc), *FLAGS, "--output_dir", str(out), "--tag", "nan", "--print_ratio", "1",
            "--max_iterations", "4", "--save_every", str(save_every)]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train(parse_args({"strategy": "none"}, argv)))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and line.startswith(f"error: non-finite loss at iteration {nan_from} (loss=nan")
    assert "found at iteration 4, when the step statistics were next read; stopped without saving" in line
    last = out / "models" / "nan_last.pth"
    if save_every == 0:
        assert "no checkpoint was written yet" in line and not last.exists()
    else:  # the save at iteration 2 stays, and the history that names it
        assert f"{last} keeps the last good state (iteration 2)" in line
        saved = load(last)
        assert saved["iteration"] == 2 and all(torch.isfinite(v.float()).all() for v in saved["model"].values())
        history = json.loads((out / "data" / "nan.json").read_text())
        assert history["checkpoint_sha256"]["last"] == hashlib.sha256(last.read_bytes()).hexdigest()
        assert history["config"]["tag"] == "nan" and not history["train"] and not history["validation"]


@pytest.mark.usefixtures("single_thread")
def test_non_finite_batchnorm_statistics_stop_before_the_validation(tiny_voc, tmp_path, monkeypatch, capsys):
    """Train-mode losses use the batch's statistics and stay finite while the running ones overflow (seen with
    --lr 1e6): the eval-mode forward would then score NaN, which no AP can rank. The run stops in one line."""
    import core.trainer
    from core.config import parse_args
    from core.trainer import train
    from tools.errors import run_cli

    real_step = core.trainer.train_step

    def overflowing_step(ctx, micro_batches, iteration, total):
        stats = real_step(ctx, micro_batches, iteration, total)
        if iteration + 1 == 3:
            next(m for m in ctx.bare_student.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(
                float("inf"))
        return stats

    monkeypatch.setattr(core.trainer, "train_step", overflowing_step)
    out = tmp_path / "exp"
    argv = ["--data_dir", str(tiny_voc), *FLAGS, "--output_dir", str(out), "--tag", "bn", "--print_ratio", "1",
            "--max_iterations", "4", "--save_every", "2"]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: train(parse_args({"strategy": "none"}, argv)))
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "Traceback" not in err
    last = out / "models" / "bn_last.pth"
    assert line.startswith("error: non-finite weights or BatchNorm statistics at iteration 4 ")
    assert f"stopped without saving, {last} keeps the last good state (iteration 2)" in line
    assert load(last)["iteration"] == 2 and not (out / "models" / "bn_best.pth").exists()


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"iteration": 1}, path)
    write_json({"a": 1}, tmp_path / "h.json")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous version of it is intact"):
        save_checkpoint({"iteration": 2}, path)
    assert load(path)["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth", "h.json"]  # no temp file left behind
