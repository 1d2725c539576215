"""Run a set of training scripts x seeds with one shared recipe, one tag per (script, seed), one after another.

    python run_experiments.py --scripts A.py B.py ... --seeds 0 1 2 [--demo | --data_dir DIR] [training flags]

Every flag this tool does not know is passed to every run unchanged. Tags are <prefix>@<strategy>@seed<S>
(the prefix defaults to "demo" with --demo, else "exp"). Rerunning the same command continues where it
stopped: finished runs are skipped (after checking that they were trained with this recipe), and every other
run is started with `--resume auto`, so a killed run resumes from its last checkpoint and one killed before
its first checkpoint starts over. `--dry_run` prints those command lines instead (for a cluster's job array;
they are safe to requeue). compare_experiments.py then
compares the groups.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from core.config import OneLineParser, parse_args
from core.recipe import flag_defaults, recipe_changes
from tools.errors import UserError, run_cli
from tools.run_files import RunFiles

REPO = Path(__file__).resolve().parent
# --help's description: the first line of this docstring, then the flags it passes on, with an example
PASSTHROUGH = """Every flag not listed below is passed to every run unchanged (the training flags,
docs/flags.md). For example

    python run_experiments.py --scripts train_classification.py --seeds 0 1 --demo --max_iterations 20

trains seeds 0 and 1, each with --demo --max_iterations 20."""
# flags that the tool sets per run, or that would fight its own resuming
OWNED_FLAGS = ("--tag", "--seed", "--resume", "--overwrite")


def build_parser() -> argparse.ArgumentParser:
    first = textwrap.fill(" ".join(__doc__.split("\n\n")[0].split()), width=80)
    p = OneLineParser(description=f"{first}\n\n{PASSTHROUGH}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", required=True, help="training scripts, e.g. train_classification.py")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--prefix", default=None, help="the tags' first part (default: demo with --demo, else exp)")
    p.add_argument("--dry_run", action="store_true", help="print the command lines, run nothing")
    return p


@dataclass
class PlannedRun:
    script: Path
    seed: int
    tag: str
    argv: list[str]  # the training flags of this run, without --resume / --overwrite
    state: str  # new | finished | resume (a last checkpoint exists)

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), *self.argv, "--resume", "auto"]


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
            runs.append(PlannedRun(script, seed, tag, argv, run_state(files, config, script)))
    return runs


def best_map(output_dir: Path, tag: str) -> str:
    try:
        history = json.loads(RunFiles(output_dir, tag).history.read_text())
        return f"best val mAP {max(r['mAP'] for r in history['validation']):.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "no validation recorded"


def run_all(args: argparse.Namespace, passthrough: list[str]) -> None:
    runs = plan(args, passthrough)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run.command()) if run.state != "finished" else f"# finished: {run.tag}")
        return
    output_dir = Path(parse_args(script_defaults(runs[0].script), passthrough).output_dir)
    start = time.time()
    for number, run in enumerate(runs, 1):
        head = f"[{number}/{len(runs)}] {run.tag} ({run.script.name}, seed {run.seed})"
        if run.state == "finished":
            print(f"{head}: finished earlier, skipped; {best_map(output_dir, run.tag)}", flush=True)
            continue
        word = "resuming from its last checkpoint" if run.state == "resume" else "starting"
        print(f"{head}: {word} (total {time.time() - start:.0f} s so far)", flush=True)
        began = time.time()
        code = subprocess.call(run.command(), cwd=REPO)
        if code != 0:
            raise UserError(f"run {run.tag} stopped with exit code {code} (its log: "
                            f"{RunFiles(output_dir, run.tag).log}); fix the cause and rerun this command: finished "
                            "runs are skipped and this one resumes")
        print(f"{head}: done in {time.time() - began:.0f} s; {best_map(output_dir, run.tag)}", flush=True)
    print(f"# {len(runs)} runs in {time.time() - start:.0f} s; compare them with "
          f"python compare_experiments.py --dir {output_dir} --baseline puzzle", flush=True)


def main(argv: list[str] | None = None) -> None:
    def go() -> None:
        args, passthrough = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
        run_all(args, passthrough)

    run_cli(go)


if __name__ == "__main__":
    main()
