"""Which flags define a run's result, and the check that `--resume` continues the same recipe.

A checkpoint records the flags it was trained with (its `config`) and the script that trained it.
`--resume` compares them with the current ones through `recipe_changes` and refuses, in one line, any
change that would make the finished run a mix of two recipes. Only the flags defined with free=True in
core/config.py may differ: where files are, how many workers load them, how often to log or save, and
two memory knobs (accum_steps and patch_chunk split the same batch into smaller forwards: the result
changes by float summation order only, and the change is recorded in the history's "resumes"). Every
other flag is compared, including ones added later. max_iterations is the one free flag that changes a
result (where the run stops): comparisons (tools/groups.py) compare the iteration each run finished at instead.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from core.config import DEMO_DEFAULTS, build_parser, free_flags
from tools.errors import UserError

FREE_FLAGS = free_flags()
# every other flag: the recipe that tools print beside a checkpoint, led by what is trained (the parser's order)
_COMPARED = [action.dest for action in build_parser({})._actions if action.dest not in ("help", *FREE_FLAGS)]
RUN_DEFINING_FLAGS = ("strategy", "architecture", *(name for name in _COMPARED if name not in ("strategy",
                                                                                             "architecture")))
NOT_RECORDED = ("tag", "resume", "overwrite", "output_dir")  # differences not worth a "resumes" entry
REASONS = {
    "max_epoch": "the poly lr schedule spans max_epoch epochs; use --max_iterations N to stop earlier",
    "batch_size": "the schedule's iterations per epoch and every step's gradient depend on it",
}


def current_script() -> str:
    """The training script's file name, as checkpoints record it."""
    return Path(sys.argv[0]).name


def flag_defaults(demo: bool) -> dict:
    """Every flag's default (the --demo recipe's when `demo`): a flag that a checkpoint does not
    record did not exist yet, and the run behaved as its default."""
    parser = build_parser({})
    if demo:
        parser.set_defaults(**DEMO_DEFAULTS)
    return vars(parser.parse_args([]))


def recipe_changes(saved: dict, current: dict, defaults: dict) -> list[tuple[str, Any, Any]]:
    """(flag, saved value, current value) of every compared flag that differs.

    A flag the checkpoint lacks is compared with its default; one the current code lacks is skipped.
    """
    changes = []
    for name, new in current.items():
        if name in FREE_FLAGS:
            continue
        if name in saved:
            old = saved[name]
        elif name in defaults:
            old = defaults[name]
        else:
            continue
        if old != new:
            changes.append((name, old, new))
    return changes


def free_changes(saved: dict, current: dict) -> dict:
    """{flag: [saved, current]} of the allowed differences worth recording."""
    return {name: [saved[name], current[name]] for name in FREE_FLAGS
            if name in saved and name in current and name not in NOT_RECORDED and saved[name] != current[name]}


def _describe(name: str, old: Any, new: Any) -> str:
    reason = f" ({REASONS[name]})" if name in REASONS else ""
    return f"--{name} {old} → {new}{reason}"


def check_resume(checkpoint: Any, current: dict, script: str, path: Path) -> dict:
    """Refuse (UserError, one line) to resume `checkpoint` with another script or recipe; returns the
    allowed differences ({flag: [saved, current]}) for the history."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict):
        raise UserError(f"--resume: {path} is not a checkpoint of the training scripts (no 'config' entry)")
    saved = checkpoint["config"]
    saved_script = checkpoint.get("script") or (checkpoint.get("history") or {}).get("script")
    parts = [f"script {saved_script} → {script}"] if saved_script and saved_script != script else []
    changes = recipe_changes(saved, current, flag_defaults(bool(saved.get("demo"))))
    parts += [_describe(*change) for change in changes]
    if parts:
        raise UserError(
            f"--resume {path}: the checkpoint was trained with another recipe ({'; '.join(parts)}); a resumed "
            "run must continue the same one — pass the saved values (and its script), or start a new --tag "
            "(or --overwrite this one)"
        )
    return free_changes(saved, current)


def check_stop(iteration: int, stop_at: int, total: int, path: Path) -> None:
    """--max_iterations may move the stop up to the schedule's end, never before the checkpoint."""
    if stop_at < iteration:
        raise UserError(f"--resume {path}: --max_iterations {stop_at} is before the checkpoint's iteration "
                        f"{iteration}; pass a value from {iteration} to {total} (the schedule's end) or drop it")
