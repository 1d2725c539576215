"""Run a set of training scripts x seeds with one shared recipe, one tag per (script, seed): one after another,
several at once on this machine's GPUs or CPUs, or as a SLURM job array.

    python run_experiments.py --scripts A.py B.py ... --seeds 0 1 2 [--demo | --data_dir DIR] [training flags]
        [--parallel N [--gpus 0,1,2,3] [--gpus_per_run K] [--threads_per_run T]]
        [--launcher slurm [--partition P] [--timeout_min M] ...]  [--dry_run | --status]

Every flag this tool does not know is passed to every run unchanged. Tags are <prefix>@<strategy>@seed<S>
(the prefix defaults to "demo" with --demo, else "exp"). Rerunning the same command continues where it
stopped: finished runs are skipped (after checking that they were trained with this recipe), and every other
run is started with `--resume auto`, so a killed run resumes from its last checkpoint and one killed before
its first checkpoint starts over. `--dry_run` prints those command lines instead (for a cluster's job array;
they are safe to requeue); `--status` lists each run as finished, running, queued or failed, with its log.
Each run's record and output are kept in <output_dir>/sweeps/<prefix>/ (docs/cluster.md#sweeps).
compare_experiments.py then compares the groups.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import textwrap
from pathlib import Path

from core.config import OneLineParser, parse_args
from core.recipe import flag_defaults, recipe_changes
from tools.errors import UserError, run_cli
from tools.run_files import RunFiles
from tools.sweep import LocalSweep, PlannedRun, local_slots, status_lines, sweep_folder

REPO = Path(__file__).resolve().parent
# --help's description: the first line of this docstring, then the flags it passes on, with an example
PASSTHROUGH = """Every flag not listed below is passed to every run unchanged (the training flags,
docs/flags.md). For example

    python run_experiments.py --scripts train_classification.py --seeds 0 1 --demo --max_iterations 20

trains seeds 0 and 1, each with --demo --max_iterations 20."""
# flags that the tool sets per run, or that would fight its own resuming
OWNED_FLAGS = ("--tag", "--seed", "--resume", "--overwrite")
LOCAL_ONLY = ("parallel", "gpus")
SLURM_ONLY = ("partition", "account", "cpus_per_run", "timeout_min", "array_parallelism", "slurm_extra")


def build_parser() -> argparse.ArgumentParser:
    first = textwrap.fill(" ".join(__doc__.split("\n\n")[0].split()), width=80)
    # no abbreviations: a training flag that starts like one of these (--seed, --gpu...) goes to the runs
    p = OneLineParser(description=f"{first}\n\n{PASSTHROUGH}", formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    p.add_argument("--scripts", nargs="+", required=True, help="training scripts, e.g. train_classification.py")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--prefix", default=None, help="the tags' first part (default: demo with --demo, else exp)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the command lines (slurm: and the sbatch parameters); run nothing")
    p.add_argument("--status", action="store_true",
                   help="list each run: finished, running, queued or failed, with its log; run nothing")
    p.add_argument("--launcher", choices=("local", "slurm"), default="local",
                   help="local: on this machine; slurm: one submitit job array (pip install submitit)")
    p.add_argument("--gpus_per_run", type=int, default=None,
                   help="GPUs of each run (local: default 1 when GPUs are shared out; slurm: default 1, 0 for none)")
    p.add_argument("--threads_per_run", type=int, default=None,
                   help="OMP_NUM_THREADS of each run (default: unset; local with --parallel N: its share of the CPUs)")
    local = p.add_argument_group("--launcher local")
    local.add_argument("--parallel", type=int, default=None,
                       help="runs at once (default 1, or one per --gpus_per_run group of --gpus)")
    local.add_argument("--gpus", default=None, help="CUDA devices to share out, e.g. 0,1,2,3 (default with "
                       "--parallel on a CUDA machine: all it sees)")
    slurm = p.add_argument_group("--launcher slurm")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpus_per_run", type=int, default=None, help="sbatch --cpus-per-task (default: the "
                       "cluster's)")
    slurm.add_argument("--timeout_min", type=int, default=24 * 60,
                       help="each job's time limit; a run that needs longer is requeued and resumes")
    slurm.add_argument("--array_parallelism", type=int, default=None,
                       help="jobs of the array running at once (default: all)")
    slurm.add_argument("--slurm_extra", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm_extra qos=high --slurm_extra mem=64G (repeatable)")
    return p


def check_launcher_flags(args: argparse.Namespace, argv: list[str]) -> None:
    """A flag of the other launcher, or a value that no launcher takes: refused before anything is planned."""
    given = {word.split("=")[0].removeprefix("--") for word in argv if word.startswith("--")}
    others = SLURM_ONLY if args.launcher == "local" else LOCAL_ONLY
    wrong = [name for name in others if name in given]
    if wrong:
        fix = "add --launcher slurm" if args.launcher == "local" else "SLURM gives each job its own GPUs " \
            "(--gpus_per_run) and runs the array's jobs at once (--array_parallelism)"
        raise UserError(f"--{wrong[0]} is a flag of --launcher {'slurm' if args.launcher == 'local' else 'local'}; "
                        f"{fix}")
    if args.dry_run and args.status:
        raise UserError("--dry_run and --status: pass one of them")
    for name in ("cpus_per_run", "array_parallelism", "threads_per_run"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: give 1 or more")
    if args.timeout_min < 1:
        raise UserError(f"--timeout_min {args.timeout_min}: a job needs a time limit of 1 minute or more")
    if args.launcher == "slurm" and args.gpus_per_run is not None and args.gpus_per_run < 0:
        raise UserError(f"--gpus_per_run {args.gpus_per_run}: give 0 or more")
    pairs = []
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise UserError(f"--slurm_extra {item}: give KEY=VALUE with an sbatch option's long name, e.g. qos=high")
        pairs.append((key, value))
    args.slurm_extra = pairs


def slurm_launcher():
    """tools.sweep_slurm, once submitit is known to be installed (an optional requirement)."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise UserError("--launcher slurm needs submitit, an optional requirement: pip install submitit "
                        "(README, Install)") from None
    from tools import sweep_slurm

    return sweep_slurm


def script_defaults(path: Path) -> dict:
    """A training script's DEFAULTS (importing it runs nothing: the scripts call main under __main__)."""
    spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"--scripts {path}: cannot import it ({type(exc).__name__}: {exc})") from None
    defaults = getattr(module, "DEFAULTS", None)
    if not isinstance(defaults, dict):
        raise UserError(f"--scripts {path} is not a training script of this repository (no DEFAULTS)")
    return defaults


def resolve_script(name: str) -> Path:
    path = Path(name)
    for candidate in (path, REPO / path):
        if candidate.is_file() and candidate.suffix == ".py":
            return candidate.resolve()
    raise UserError(f"--scripts {name}: no such script; pass a training script such as "
                    "train_classification_with_puzzle_cTopk_w_ema.py")


def run_state(files: RunFiles, config: dict, script: Path) -> str:
    """new (nothing to continue), finished or resume (a last checkpoint exists)."""
    if not files.existing():
        return "new"
    try:
        history = json.loads(files.history.read_text())
    except (OSError, ValueError):
        history = None
    if isinstance(history, dict) and isinstance(history.get("config"), dict):
        saved = history["config"]
        # a flag still None or "auto" here is resolved from the data by the run itself (--dataset, --eval_resize,
        # the splits), and the run's own --resume check compares it then
        changes = [(name, old, new) for name, old, new in recipe_changes(saved, config, flag_defaults(
            bool(saved.get("demo")))) if new not in (None, "auto")]
        if changes or history.get("script", script.name) != script.name:
            described = "; ".join(f"--{name} {old} → {new}" for name, old, new in changes) or "another script"
            raise UserError(f"--tag {files.tag} in {files.root} was trained with another recipe ({described}); "
                            "pass the same flags as before, or another --prefix or --output_dir")
        # where this command stops: the schedule's end, or its own --max_iterations (a free flag)
        stop = min(history.get("total_iterations") or 0, config.get("max_iterations") or 10 ** 12)
        if history.get("finished_iteration", -1) >= stop > 0:
            return "finished"
    return "resume" if files.checkpoint("last").exists() else "new"


def plan(args: argparse.Namespace, passthrough: list[str]) -> list[PlannedRun]:
    owned = [flag for flag in passthrough if flag.split("=")[0] in OWNED_FLAGS]
    if owned:
        raise UserError(f"{owned[0].split('=')[0]} is set by run_experiments.py for each run; drop it "
                        "(tags come from --prefix, seeds from --seeds, resuming is automatic)")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds lists a seed twice ({' '.join(map(str, args.seeds))})")
    scripts = [resolve_script(name) for name in args.scripts]
    runs, tags = [], set()
    for script in scripts:
        defaults = script_defaults(script)
        for seed in args.seeds:
            probe = parse_args(defaults, [*passthrough, "--seed", str(seed)])  # bad flags fail here, one line
            prefix = args.prefix or ("demo" if probe.demo else "exp")
            tag = f"{prefix}@{probe.strategy}@seed{seed}"
            if tag in tags:
                raise UserError(f"two scripts give the tag {tag} (the same strategy); run them with different --prefix")
            tags.add(tag)
            argv = [*passthrough, "--seed", str(seed), "--tag", tag]
            config = vars(parse_args(defaults, argv))
            files = RunFiles(Path(config["output_dir"]), tag)
            runs.append(PlannedRun(script, seed, tag, argv, run_state(files, config, script), files.root))
    return runs


def run_local(runs: list[PlannedRun], args: argparse.Namespace, passthrough: list[str]) -> None:
    device = parse_args(script_defaults(runs[0].script), passthrough).device
    slots = local_slots(args.parallel, args.gpus, args.gpus_per_run, args.threads_per_run, device)
    if args.dry_run:
        if len(slots) > 1 or slots[0].env():
            print(f"# --parallel {len(slots)}: each run on one of: {'; '.join(s.describe() for s in slots)}")
        # the thread count is the same for every slot, and a CPU run's numbers depend on it: part of the command
        threads = f"OMP_NUM_THREADS={slots[0].threads} " if slots[0].threads else ""
        for run in runs:
            print(threads + shlex.join(run.command()) if run.state != "finished" else f"# finished: {run.tag}")
        return
    sweep = LocalSweep(runs, slots, sweep_folder(runs))
    compare = f"python compare_experiments.py --dir {runs[0].output_dir} --baseline puzzle"
    if len(slots) == 1:  # one after another, the output inline; the first failure stops the sweep
        def stop(job, reason: str) -> None:
            if not sweep.stopping:  # a run that failed on its own, not one stopped by this launcher's signal
                raise UserError(f"run {job.run.tag} {reason} (its log: {job.run.files.log}); fix the cause and "
                                "rerun this command: finished runs are skipped and this one resumes")

        seconds = sweep.run(on_failure=stop)
        if sweep.stopping:
            print(sweep.summary(seconds)[-1], flush=True)
            raise SystemExit(128 + sweep.stopping)
        print(f"# {len(runs)} runs in {seconds:.0f} s; compare them with {compare}", flush=True)
        return
    seconds = sweep.run()
    print("\n".join(sweep.summary(seconds)), flush=True)
    if sweep.stopping:
        raise SystemExit(128 + sweep.stopping)
    if any(state == "failed" for state, _ in sweep.outcomes.values()):
        raise SystemExit(1)
    print(f"# compare them with {compare}", flush=True)


def run_all(args: argparse.Namespace, passthrough: list[str], argv: list[str]) -> None:
    check_launcher_flags(args, argv)
    slurm = slurm_launcher() if args.launcher == "slurm" else None
    runs = plan(args, passthrough)
    if args.status:
        print("\n".join(status_lines(runs, sweep_folder(runs), slurm)), flush=True)
    elif slurm is not None:
        slurm.launch(runs, args, sweep_folder(runs), shlex.join(["python", "run_experiments.py", *argv, "--status"]))
    else:
        run_local(runs, args, passthrough)


def main(argv: list[str] | None = None) -> None:
    def go() -> None:
        given = sys.argv[1:] if argv is None else list(argv)
        args, passthrough = build_parser().parse_known_args(given)
        run_all(args, passthrough, given)

    run_cli(go)


if __name__ == "__main__":
    main()
