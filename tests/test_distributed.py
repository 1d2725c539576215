"""torchrun (DDP over gloo on the CPU), gradient accumulation and bf16 autocast, against a plain run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# cTopk-w: the student is called once per batch, so under torchrun rank 0 holds the reference's first
# BatchNorm chunk and the running statistics agree too (Max's per-image tile calls would be split).
SCRIPT = str(ROOT / "train_classification_with_puzzle_cTopk_w_ema.py")
# backbone BN in fix mode, 4 reference chunks of 2 images: the CSI head's batch statistics are per chunk,
# the same whether the 8 images sit in one process or two
FLAGS = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "fix",
         "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
         "--batch_size", "8", "--num_workers", "0", "--lr", "0.01", "--max_iterations", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def single_run(tiny_voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    res = subprocess.run([sys.executable, SCRIPT, "--data_dir", str(tiny_voc), *FLAGS, "--output_dir", str(out),
                          "--tag", "single"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def weights(out: Path, tag: str) -> dict:
    return torch.load(out / "models" / f"{tag}_last.pth", map_location="cpu", weights_only=False)["model"]


def assert_close_weights(a: dict, b: dict, statistics: bool = True) -> None:
    for key in a:
        if statistics or not ("running" in key or "num_batches" in key):
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=1e-4), key


def history(out: Path, tag: str) -> dict:
    return json.loads((out / "data" / f"{tag}.json").read_text())


def test_torchrun_two_processes_match_one_process(tiny_voc, single_run, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", SCRIPT,
                          "--data_dir", str(tiny_voc), *FLAGS, "--output_dir", str(tmp_path), "--tag", "ddp"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    # after 2 optimizer steps, 2 ranks x 4 images equal 1 process x 8 images
    assert_close_weights(weights(tmp_path, "ddp"), weights(single_run, "single"))
    ddp, single = history(tmp_path, "ddp")["validation"][-1], history(single_run, "single")["validation"][-1]
    # every validation image scored exactly once: same count and same mAP as the single process
    assert ddp["num_images"] == single["num_images"] == 10
    assert ddp["mAP"] == pytest.approx(single["mAP"], abs=1e-3)
    assert ddp["mAP_voc"] == pytest.approx(single["mAP_voc"], abs=1e-3)
    # the localisation tallies of both ranks are merged: every (image, class) pair counted once
    for key in ("pointing_game", "hit_rate_cmax", "hit_rate_max", "box_distance_ctopk_w"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-3), key
    assert history(tmp_path, "ddp")["config"]["tag"] == "ddp"
    assert not (tmp_path / "logs" / "ddp.txt").read_text().count("# config") > 1  # rank 0 alone writes


def test_gradient_accumulation_matches_the_full_batch(tiny_voc, single_run, tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--data_dir", str(tiny_voc), *FLAGS, "--accum_steps", "2",
                          "--output_dir", str(tmp_path), "--tag", "accum"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    # parameters only: each micro-batch is its own student call, so the running statistics are updated
    # from the first chunk of each (two updates where the reference made one)
    assert_close_weights(weights(tmp_path, "accum"), weights(single_run, "single"), statistics=False)


def test_bf16_autocast_runs_on_cpu(tiny_voc, tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--data_dir", str(tiny_voc), *FLAGS, "--amp", "bf16",
                          "--output_dir", str(tmp_path), "--tag", "bf16"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = history(tmp_path, "bf16")["train"]
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_torchrun_with_uneven_validation_shards(tiny_voc, tmp_path):
    """9 val images over 2 ranks with eval batches of 4: rank 0 runs 2 batches, rank 1 one; no hang."""
    ids = (tiny_voc / "ImageSets" / "Main" / "val.txt").read_text().split()[:9]
    split = tmp_path / "val9.txt"
    split.write_text("\n".join(ids) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = [f for f in FLAGS]
    flags[flags.index("--max_iterations") + 1] = "1"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", SCRIPT,
                          "--data_dir", str(tiny_voc), *flags, "--val_split", str(split), "--eval_batch_size", "4",
                          "--output_dir", str(tmp_path), "--tag", "uneven"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert history(tmp_path, "uneven")["validation"][-1]["num_images"] == 9


def test_torchrun_restarts_a_killed_worker_and_resume_auto_is_bitwise_equal(tiny_voc, tmp_path):
    """--max_restarts 1 with --resume auto: rank 1 is SIGKILLed at iteration 3 (core/trainer.py's test-only
    OASS_TEST_KILL_RANK_AT hook, first attempt only); torchrun restarts both workers, which continue from
    <tag>_last.pth and end with the weights of a run that was never interrupted."""
    flags = [f for f in FLAGS]
    flags[flags.index("--max_iterations"):flags.index("--max_iterations") + 2] = ["--max_epoch", "2"]  # 4 iterations

    def torchrun(tag: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "--max_restarts=1", SCRIPT, "--data_dir", str(tiny_voc), *flags, "--save_every", "1",
                               "--resume", "auto", "--output_dir", str(tmp_path), "--tag", tag],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env})

    straight = torchrun("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = torchrun("killed", OASS_TEST_KILL_RANK_AT="1:3")
    if killed.returncode != 0 and "connectFullMesh" in killed.stderr:
        # Before core/runtime.py gave each torchrun attempt its own store keys, the restarted group's gloo
        # connection sometimes timed out (twice in our full-suite runs). Should it happen again, a requeue runs
        # the same command; --resume auto continues from the last checkpoint, and the weights must still match.
        killed = torchrun("killed")
    assert killed.returncode == 0, killed.stderr[-3000:]
    log = (tmp_path / "logs" / "killed.txt").read_text()
    assert "resumed from" in log and log.count("# config") == 1  # the restart continued, it did not start over
    a, b = (torch.load(tmp_path / "models" / f"{tag}_last.pth", map_location="cpu", weights_only=True)
            for tag in ("straight", "killed"))
    assert a["iteration"] == b["iteration"] == 4
    for part in ("model", "teacher"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    assert [v["mAP"] for v in a["history"]["validation"]] == [v["mAP"] for v in b["history"]["validation"]]
