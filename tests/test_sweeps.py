"""run_experiments.py's launchers: --parallel on this machine against sequential runs of the same commands, and
--launcher slurm through submitit against a fake SLURM on PATH (tests/fake_slurm.py): a job array, a requeue
after the signals of a preemption, a killed job in --status, the same command submitted again."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tool_calls import call

import compare_experiments
import run_experiments
from tools.sweep import PlannedRun, Records, Slot, describe_exit, local_slots, status_lines

ROOT = Path(__file__).resolve().parents[1]
PLAIN, PUZZLE, CTOPK_W = ("train_classification.py", "train_classification_with_puzzle.py",
                          "train_classification_with_puzzle_cTopk_w_ema.py")
ITERATIONS = 8  # 2 epochs of the tiny set: a validation, hence a checkpoint, at iteration 4
SMALL = ["--architecture", "resnet18", "--pretrained", "none", "--image_size", "64", "--min_image_size", "48",
         "--max_image_size", "80", "--batch_size", "4", "--num_workers", "0", "--min_distance", "8",
         "--max_iterations", str(ITERATIONS), "--print_ratio", "1"]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def sweep(*argv: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_experiments.py"), *argv], capture_output=True, text=True,
                          env=env or ONE_THREAD, timeout=timeout, cwd=ROOT)


def assert_same_run(out_a: Path, out_b: Path, tag: str) -> None:
    """Bitwise: the weights (student, teacher), the optimiser's momentum and every logged loss and metric."""
    a, b = (torch.load(out / "models" / f"{tag}_last.pth", map_location="cpu", weights_only=True)
            for out in (out_a, out_b))
    assert a["iteration"] == b["iteration"] == ITERATIONS
    for part in ("model", "teacher"):
        assert (part in a) == (part in b)
        for key, value in (a.get(part) or {}).items():
            assert torch.equal(value, b[part][key]), (tag, part, key)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"]), tag

    def numbers(out: Path) -> tuple[list, list]:
        history = json.loads((out / "data" / f"{tag}.json").read_text())
        drop = ("seconds_per_iteration", "checkpoints")  # timings, and hashes of files that hold them
        return tuple([{k: v for k, v in r.items() if k not in drop} for r in history[part]]
                     for part in ("train", "validation"))

    train_a, val_a = numbers(out_a)
    assert (train_a, val_a) == numbers(out_b) and len(train_a) == 2 and len(val_a) == 2, tag


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    from tools.demo_data import generate_demo_dataset

    return generate_demo_dataset(tmp_path_factory.mktemp("sweep_voc") / "voc", num_train=16, num_val=12,
                                 min_side=48, max_side=64, seed=2)


def flags(voc: Path, out: Path) -> list[str]:
    return ["--data_dir", str(voc), "--train_split", "main:train", "--val_split", "main:val", *SMALL,
            "--output_dir", str(out)]


@pytest.fixture(scope="module")
def sequential(voc, tmp_path_factory) -> Path:
    """Today's launcher: the two runs one after another, one thread each (OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("sequential")
    done = sweep("--scripts", PLAIN, CTOPK_W, "--seeds", "0", "--prefix", "t", *flags(voc, out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/2] t@none@seed0" in done.stdout and "[2/2] t@ctopk_w@seed0" in done.stdout
    return out


# ----------------------------------------------------------------------------- --launcher local --parallel
def test_parallel_runs_equal_sequential_ones_and_a_failure_stops_no_other(voc, sequential, tmp_path, capsys):
    out = tmp_path / "exp"
    # the puzzle run is made to fail: a damaged last checkpoint, which its --resume auto refuses (exit 2)
    (out / "models").mkdir(parents=True)
    (out / "models" / "t@puzzle@seed0_last.pth").write_bytes(b"not a checkpoint")
    argv = ["--scripts", PUZZLE, PLAIN, CTOPK_W, "--seeds", "0", "--prefix", "t", *flags(voc, out),
            "--parallel", "2", "--threads_per_run", "1"]
    done = sweep(*argv, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("[1/3] t@puzzle@seed0: failed after") and "bad input (exit 2)" in line
               for line in lines), done.stdout
    assert "# 3 runs in" in done.stdout and "2 finished, 0 skipped, 1 failed" in done.stdout
    assert "#   failed: t@puzzle@seed0: bad input (exit 2): error:" in done.stdout
    # both slots were used: the CPUs shared out, one thread each; the failure freed its slot for the third run
    assert sum("1 thread; its output:" in line for line in lines) == 3
    for tag in ("t@none@seed0", "t@ctopk_w@seed0"):
        assert_same_run(sequential, out, tag)
        record = json.loads((out / "sweeps" / "t" / f"{tag}.json").read_text())
        assert record["state"] == "finished" and record["env"]["OMP_NUM_THREADS"] == "1"
        assert "--resume auto" in record["command"] and Path(record["console"]).is_file()

    status = sweep(*argv, "--status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("t@")}
    assert rows["t@none@seed0"].split()[1] == "finished" and rows["t@ctopk_w@seed0"].split()[1] == "finished"
    assert rows["t@puzzle@seed0"].split()[1] == "failed" and "bad input (exit 2)" in rows["t@puzzle@seed0"]
    assert f"log {out / 'logs' / 't@puzzle@seed0.txt'}" in rows["t@puzzle@seed0"]
    assert "2 finished, 0 running, 0 queued, 1 failed" in status.stdout
    # --dry_run: what is left, with the thread count that each run gets (its numbers depend on it)
    code, text, err = call(run_experiments.main, [*argv, "--dry_run"], capsys)
    lines = text.splitlines()
    assert code == 0 and lines[0].startswith("# --parallel 2: each run on one of:") and "1 thread" in lines[0], err
    assert lines[1].startswith("OMP_NUM_THREADS=1 ") and "--tag t@puzzle@seed0" in lines[1]
    assert lines[2:] == ["# finished: t@none@seed0", "# finished: t@ctopk_w@seed0"]


def test_local_slots_share_the_cpus_and_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr("tools.sweep.cuda_device_count", lambda: 0)
    assert local_slots(None, None, None, None, "auto") == [Slot()]  # today's launcher: nothing changed
    assert local_slots(2, None, None, None, "auto") == [Slot(cpus=(0, 1, 2, 3), threads=4),
                                                       Slot(cpus=(4, 5, 6, 7), threads=4)]
    assert [s.threads for s in local_slots(3, None, None, 1, "auto")] == [1, 1, 1]
    monkeypatch.setattr("tools.sweep.cuda_device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    slots = local_slots(None, "0,1,2,3", None, None, "auto")
    assert [s.gpus for s in slots] == [(0,), (1,), (2,), (3,)] and slots[3].cpus == (6, 7)
    assert slots[3].env() == {"CUDA_VISIBLE_DEVICES": "7", "OMP_NUM_THREADS": "2"}  # the index torch sees, mapped
    assert [s.gpus for s in local_slots(None, "0,1,2,3", 2, None, "auto")] == [(0, 1), (2, 3)]
    assert [s.gpus for s in local_slots(2, None, None, None, "auto")] == [(0,), (1,)]  # every visible GPU, shared
    assert local_slots(2, None, None, None, "cpu")[0].gpus == ()
    assert describe_exit(143).startswith("stopped by SIGTERM (exit 143) after saving")
    assert describe_exit(-9).startswith("killed by SIGKILL")


def test_status_of_a_local_run_whose_process_is_gone(tmp_path):
    """A run killed together with its launcher: its record says running, its process is gone."""
    run = PlannedRun(ROOT / PLAIN, 0, "t@none@seed0", [], "new", tmp_path)
    records = Records(tmp_path / "sweeps" / "t")
    alive = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", run.tag],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert alive.stdout.readline() == "up\n"
        records.write(run.tag, launcher="local", state="running", pid=alive.pid, host=socket.gethostname(),
                      devices="CPU 0, 1 thread", console=str(records.folder / "t@none@seed0.out"))
        line = status_lines([run], records.folder)[0]
        assert line.split()[1] == "running" and f"pid {alive.pid}" in line, line
    finally:
        alive.kill()
        alive.wait()
    line, counts = status_lines([run], records.folder)
    assert line.split()[1] == "failed" and "its process is gone" in line and "t@none@seed0.out" in line
    assert f"log {tmp_path / 'logs' / 't@none@seed0.txt'}" in line and "0 running, 0 queued, 1 failed" in counts


def test_bad_input_is_one_line_and_starts_nothing(voc, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    base = ["--scripts", PLAIN, "--seeds", "0", *flags(voc, out)]
    cases = [
        ([*base, "--parallel", "0"], "--parallel 0"),
        ([*base, "--gpus", "0"], "--gpus 0: there is no CUDA device here"),  # no CUDA here: any GPU is missing
        ([*base, "--gpus", "0,x"], "--gpus 0,x"),
        ([*base, "--launcher", "slurm", "--timeout_min", "0"], "--timeout_min 0"),
        ([*base, "--partition", "gpu"], "--partition is a flag of --launcher slurm"),
        ([*base, "--launcher", "slurm", "--gpus", "0"], "--gpus is a flag of --launcher local"),
        ([*base, "--launcher", "slurm", "--slurm_extra", "qos"], "--slurm_extra qos"),
        (["--scripts", PLAIN, PLAIN, "--seeds", "0", *flags(voc, out), "--parallel", "2"], "two scripts give the tag"),
        (["--scripts", PLAIN, PLAIN, "--seeds", "0", *flags(voc, out), "--launcher", "slurm"],
         "two scripts give the tag"),
        ([*base, "--launcher", "slurm", "--status", "--dry_run"], "--dry_run and --status"),
    ]
    if torch.cuda.is_available():
        cases[1] = ([*base, "--gpus", str(torch.cuda.device_count())], "there is no GPU")
    for argv, words in cases:
        code, out_text, err = call(run_experiments.main, argv, capsys)
        assert words in one_error_line(code, err), (argv, err)
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if it were not installed
    code, _, err = call(run_experiments.main, [*base, "--launcher", "slurm"], capsys)
    assert "needs submitit, an optional requirement: pip install submitit" in one_error_line(code, err)
    assert not out.exists()  # nothing ran, nothing was written


# ----------------------------------------------------------------------------- --launcher slurm
submitit = pytest.importorskip("submitit")  # requirements-dev.txt


@pytest.fixture()
def fake_slurm(tmp_path, monkeypatch) -> SimpleNamespace:
    """sbatch, srun, sacct, scontrol and scancel of tests/fake_slurm.py first on PATH, for this process and its
    children; its state in a folder of the test's own."""
    bin_dir = tmp_path / "fake_bin"
    subprocess.run([sys.executable, str(ROOT / "tests" / "fake_slurm.py"), "install", str(bin_dir)], check=True)
    env = {**ONE_THREAD, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FAKE_SLURM_DIR": str(tmp_path / "fake_slurm_state")}
    for key in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(key, env[key])
    return SimpleNamespace(env=env, state=Path(env["FAKE_SLURM_DIR"]))


def test_dry_run_shows_the_array_its_sbatch_parameters_and_commands(voc, tmp_path, capsys):
    out = tmp_path / "exp"
    code, text, err = call(run_experiments.main, [
        "--scripts", PLAIN, CTOPK_W, "--seeds", "0", "1", "--prefix", "t", *flags(voc, out), "--launcher", "slurm",
        "--partition", "gpu", "--account", "lab", "--cpus_per_run", "8", "--timeout_min", "240",
        "--array_parallelism", "3", "--slurm_extra", "qos=high", "--threads_per_run", "2", "--dry_run"], capsys)
    assert code == 0, err
    lines = text.splitlines()
    assert "4 runs in one job array, partition gpu" in lines[0]
    for expected in ("--array=0-3%3", "--partition=gpu", "--account=lab", "--cpus-per-task=8", "--gpus-per-node=1",
                     "--time=240", "--qos=high", "--signal=USR2@90", "--open-mode=append"):
        assert f"#SBATCH {expected}" in lines, expected
    assert f"--output={out / 'sweeps' / 't'}/%A_%a_0_log.out" in text
    commands = [line for line in lines if not line.startswith("#")]
    assert len(commands) == 4 and all(c.endswith("--resume auto") for c in commands)
    assert "--tag t@none@seed0" in commands[0] and "--tag t@ctopk_w@seed1" in commands[3]
    assert "# each job's environment adds: OMP_NUM_THREADS=2" in lines
    assert not out.exists()


def test_submit_without_a_cluster_is_one_line(voc, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    code, _, err = call(run_experiments.main, ["--scripts", PLAIN, "--seeds", "0", *flags(voc, tmp_path / "exp"),
                                               "--launcher", "slurm"], capsys)
    assert "no sbatch on PATH" in one_error_line(code, err)
    assert not (tmp_path / "exp" / "sweeps").exists()


def wait_until(check, what: str, timeout: float = 300):
    start = time.time()
    while not (found := check()):
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)
    return found


def task_state(fake: SimpleNamespace, job_id: str) -> str:
    job, _, task = job_id.partition("_")
    task = task or "0"  # a single job, not an array
    try:
        return json.loads((fake.state / job / f"{task}.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return ""


def status_rows(argv: list[str], env: dict) -> dict[str, str]:
    status = sweep(*argv, "--status", env=env)
    assert status.returncode == 0, status.stderr[-2000:]
    return {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("t@")}


def test_slurm_sweep_requeues_a_preempted_job_lists_a_killed_one_and_resubmits_it(
        voc, sequential, tmp_path, fake_slurm, capsys):
    out = tmp_path / "exp"
    argv = ["--scripts", PLAIN, CTOPK_W, "--seeds", "0", "--prefix", "t", *flags(voc, out), "--launcher", "slurm",
            "--partition", "debug", "--threads_per_run", "1", "--timeout_min", "60"]
    submitted = sweep(*argv, env=fake_slurm.env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "# submitted job array" in submitted.stdout and "to partition debug" in submitted.stdout
    folder = out / "sweeps" / "t"
    plain, ctopk = (json.loads((folder / f"{tag}.json").read_text())["job_id"]
                    for tag in ("t@none@seed0", "t@ctopk_w@seed0"))
    assert plain.split("_")[0] == ctopk.split("_")[0]  # one array

    # the plain run's job is cancelled as it starts (scancel: SIGTERM to all of its processes, then SIGKILL)
    wait_until(lambda: task_state(fake_slurm, plain) == "RUNNING", "the plain job to start")
    subprocess.run(["scancel", plain], check=True, env=fake_slurm.env)
    # the cTopk-w run is preempted mid-run, the way submitit's own tests do it: SIGTERM, then its USR2
    log = out / "logs" / "t@ctopk_w@seed0.txt"
    wait_until(lambda: log.exists() and "[4/" in log.read_text(), "the cTopk-w run's first epoch")
    submitit.SlurmJob(folder=folder, job_id=ctopk)._interrupt()
    wait_until(lambda: task_state(fake_slurm, plain) == "CANCELLED", "the cancellation")

    rows = status_rows(argv, fake_slurm.env)
    assert rows["t@none@seed0"].split()[1] == "failed" and f"job {plain} CANCELLED" in rows["t@none@seed0"]
    assert f"log {out / 'logs' / 't@none@seed0.txt'}" in rows["t@none@seed0"]
    assert str(folder / f"{plain}_0_log.out") in rows["t@none@seed0"]
    assert rows["t@ctopk_w@seed0"].split()[1] in ("running", "queued", "finished")

    # the same command again: the cancelled run is submitted anew, the preempted one (requeued) is left alone
    again = sweep(*argv, env=fake_slurm.env)
    assert again.returncode == 0, again.stderr[-3000:]
    plain_line, ctopk_line = (next(line for line in again.stdout.splitlines() if tag in line)
                              for tag in ("t@none@seed0", "t@ctopk_w@seed0"))
    assert "submitted as job" in plain_line and ("(starts)" in plain_line or "(resumes" in plain_line), plain_line
    assert f"as job {ctopk}, left alone" in ctopk_line or "finished, skipped" in ctopk_line, ctopk_line
    plain_again = json.loads((folder / "t@none@seed0.json").read_text())["job_id"]
    assert plain_again != plain
    for job in (plain_again, ctopk):
        wait_until(lambda job=job: task_state(fake_slurm, job) in ("COMPLETED", "FAILED", "CANCELLED"), job)
    assert task_state(fake_slurm, plain_again) == task_state(fake_slurm, ctopk) == "COMPLETED"

    rows = status_rows(argv, fake_slurm.env)
    assert all(row.split()[1] == "finished" for row in rows.values()) and len(rows) == 2, rows
    history = json.loads((out / "data" / "t@ctopk_w@seed0.json").read_text())
    assert [r["iteration"] for r in history["resumes"]][0] < ITERATIONS, "the run was not interrupted mid-run"
    output = (folder / f"{ctopk}_0_log.out").read_text()
    assert "Requeued job" in output and "exit code 143" in log.read_text()
    for tag in ("t@none@seed0", "t@ctopk_w@seed0"):
        assert_same_run(sequential, out, tag)
    final = sweep(*argv, env=fake_slurm.env)
    assert final.returncode == 0 and final.stdout.count("finished, skipped") == 2
    assert "nothing to submit" in final.stdout

    code, text, err = call(compare_experiments.main, ["--dir", out, "--baseline", "none", "--format", "csv",
                                                      "--resamples", "100"], capsys)
    assert code == 0 and "ctopk_w" in text and "none" in text


def test_the_time_limit_warning_alone_asks_the_run_to_save_then_requeues(tmp_path, fake_slurm):
    """USR2 without SIGTERM (SLURM's --signal before the time limit): the run ignores it, the job asks the run
    to save with SIGUSR1 and requeues; the requeued job runs the same command again."""
    import cloudpickle

    from tools import slurm_job

    cloudpickle.register_pickle_by_value(slurm_job)
    marks = tmp_path / "marks.txt"
    child = tmp_path / "child.py"  # a stand-in for a training run: saves on SIGUSR1, finishes once resumed
    child.write_text(textwrap.dedent("""
        import pathlib, signal, sys, time
        marks = pathlib.Path(sys.argv[1])
        if marks.exists():
            marks.write_text(marks.read_text() + "resumed\\n")
            sys.exit(0)
        def save(signum, frame):
            marks.write_text(f"saved on {signal.Signals(signum).name}\\n")
            sys.exit(128 + signum)
        signal.signal(signal.SIGUSR1, save)
        pathlib.Path(sys.argv[1] + ".started").touch()
        while True:
            time.sleep(0.05)
    """))
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(slurm_time=10)
    job = executor.submit(slurm_job.SweepRun([sys.executable, str(child), str(marks)], str(tmp_path), {}, "t", "-"))
    wait_until(lambda: Path(f"{marks}.started").exists(), "the stand-in run to start", timeout=60)
    job._interrupt(timeout=True)  # USR2 only, to every process of the job
    wait_until(lambda: task_state(fake_slurm, job.job_id) in ("COMPLETED", "FAILED", "CANCELLED"), "the job", 60)
    assert task_state(fake_slurm, job.job_id) == "COMPLETED"
    assert marks.read_text() == "saved on SIGUSR1\nresumed\n"
    assert "Requeued job" in Path(job.paths.stdout).read_text()
