"""Wall time of one small sweep run by run_experiments.py one after another (today's default) against the same
sweep with --parallel N, side by side on this machine.

    python benchmarks/parallel_sweep.py                                  # 2 scripts x seed 0, --demo, 20 iterations
    python benchmarks/parallel_sweep.py --max_iterations 60 --repeats 2  # longer runs, each order once
    python benchmarks/parallel_sweep.py --seeds 0 1 2 --parallel 2 --threads_per_run 1
    python benchmarks/parallel_sweep.py --scripts <the miniature's six> --max_iterations 0  # whole schedules

Both sweeps run the same scripts, seeds and flags into fresh output folders under a temporary directory.
The sequential one leaves each run the machine's default intra-op threads (OMP_NUM_THREADS unset: torch
uses every core), as `run_experiments.py` always did; the parallel one gives each of its N runs
--threads_per_run threads on its share of the CPUs. Repeats alternate the order (sequential first, then
parallel first) so that a change in the machine's load weighs on both. It prints each sweep's wall time,
the ratio sequential / parallel (above 1: --parallel finished sooner) and the load average around each.
The demo set and backbone are built first if missing (untimed). Any other flag goes to every run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/parallel_sweep.py` from any folder
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import load_average, machine_lines  # noqa: E402
from tools.errors import UserError, run_cli  # noqa: E402
from tools.sweep import last_error_line  # noqa: E402

SCRIPTS = ["train_classification.py", "train_classification_with_puzzle_cTopk_w_ema.py"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--scripts", nargs="+", default=SCRIPTS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--max_iterations", type=int, default=20,
                   help="iterations of each run (its last validates); 0 runs each script's whole schedule")
    p.add_argument("--parallel", type=int, default=2, help="runs at once in the parallel sweep")
    p.add_argument("--threads_per_run", type=int, default=1, help="threads of each run in the parallel sweep")
    p.add_argument("--repeats", type=int, default=1, help="sweeps of each kind; the order alternates")
    p.add_argument("--keep", default=None, help="write the sweeps' outputs here instead of a temporary folder")
    return p


def sweep_command(opts: argparse.Namespace, passthrough: list[str], out: Path, parallel: bool) -> list[str]:
    command = [sys.executable, str(ROOT / "run_experiments.py"), "--scripts", *opts.scripts, "--seeds",
               *map(str, opts.seeds), "--prefix", "bench", *passthrough, "--output_dir", str(out)]
    if opts.max_iterations:
        command += ["--max_iterations", str(opts.max_iterations)]
    if "--data_dir" not in passthrough:
        command.append("--demo")
    if parallel:
        command += ["--parallel", str(opts.parallel), "--threads_per_run", str(opts.threads_per_run)]
    return command


def timed(command: list[str], log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the runs' own default threads
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if code != 0:
        raise UserError(f"the sweep failed with exit code {code}; its output ends: {last_error_line(log)}")
    return seconds


def prepare_demo() -> None:
    """The demo set and backbone exist before anything is timed (built here, once, if missing)."""
    from tools import demo_backbone
    from tools.demo_data import default_demo_root, generate_demo_dataset

    generate_demo_dataset(default_demo_root())
    demo_backbone.demo_backbone_state(log=lambda line: print(f"# demo backbone: {line}", flush=True))


def main(argv: list[str] | None = None) -> None:
    def go() -> None:
        opts, passthrough = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
        if opts.parallel < 2 or opts.threads_per_run < 1 or opts.repeats < 1 or opts.max_iterations < 0:
            raise UserError("--parallel must be 2 or more; --threads_per_run and --repeats 1 or more; "
                            "--max_iterations 0 (whole schedules) or more")
        if "--data_dir" not in passthrough:
            prepare_demo()
        for line in machine_lines(torch.device("cpu")):
            print(line, flush=True)
        print(f"CPUs this process may use: {len(os.sched_getaffinity(0))}", flush=True)
        with tempfile.TemporaryDirectory(prefix="parallel_sweep_") as scratch:
            base = Path(opts.keep or scratch)
            times: dict[str, list[float]] = {"sequential": [], "parallel": []}
            for repeat in range(opts.repeats):
                order = ("sequential", "parallel") if repeat % 2 == 0 else ("parallel", "sequential")
                for kind in order:
                    out = base / f"{kind}_{repeat}"
                    command = sweep_command(opts, passthrough, out, kind == "parallel")
                    before = load_average()
                    seconds = timed(command, base / f"{kind}_{repeat}.log")
                    times[kind].append(seconds)
                    print(f"{kind:<10} repeat {repeat}: {seconds:7.1f} s  (load average before {before}, after "
                          f"{load_average()}): {' '.join(command[1:])}", flush=True)
        sequential, parallel = (statistics.median(times[k]) for k in ("sequential", "parallel"))
        runs = len(opts.scripts) * len(opts.seeds)
        length = f"{opts.max_iterations} iterations" if opts.max_iterations else "their whole schedule"
        print(f"{runs} runs of {length}: sequential {sequential:.1f} s, --parallel "
              f"{opts.parallel} with {opts.threads_per_run} thread(s) each {parallel:.1f} s (median of "
              f"{opts.repeats}); ratio sequential / parallel {sequential / parallel:.2f}x", flush=True)

    run_cli(go)


if __name__ == "__main__":
    main()
