"""Compare groups of training runs (one group per strategy, its seeds together) from OUTPUT_DIR/data.

    python compare_experiments.py [--dir experiments] [--baseline puzzle [none ...]] [--format markdown|csv]
                                  [--plot out.png] [--filter TEXT] [--runs]

A group is named by its strategy: the --strategy of its runs, any registered strategy (plug-ins of
strategies/ included). Per group: the number of runs and, as mean ± std over them, the best val mAP and,
at each run's best validation, mAP_voc, CF1, OF1, the pointing game and the group's own keypoint hit
rate. Against each --baseline group: ΔmAP with a 95% interval from the paired bootstrap over validation
images (tools/bootstrap.py; the same resampled images for both groups, each group's seeds averaged) and
the share of resamples above 0. The bootstrap reads the per-image scores each run saved at its best
validation (data/<tag>_val_scores.npz); a run without them, or with a file that is not its best
validation's, is refused in one line, as are runs scored on other images. --update_docs rewrites the
tables generated into markdown files (README.md, docs/miniature.md) from their data.
A group is refused, in one line naming its runs, when they differ in anything but the seed (the flags are
named), when they finished at different iterations (--max_iterations is free on --resume, but a run
stopped earlier is another result), or when two of them have the same seed; --filter TEXT then picks one
set. Only the history files are read (data/<tag>.json and data/<tag>_val_scores.npz). --runs prints one
row per run instead (tag, flags, best mAP, iterations, wall time, best checkpoint's SHA-256). --plot
draws the groups' bars with their intervals (or, with --runs, val mAP against epoch per run); it needs
matplotlib, an optional extra.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
import shlex
import sys
from pathlib import Path

from core.config import OneLineParser
from core.localisation import keypoint_strategies
from core.recipe import flag_defaults, recipe_changes
from core.strategies import STRATEGIES
from tools.errors import UserError, run_cli
from tools.groups import MethodFacts, compare_groups

REPO = Path(__file__).resolve().parent
# A table in README.md or docs/ that this tool generated: the flags that regenerate it (paths relative to the
# repository), its output, an end marker. --update_docs rewrites them; tests/test_results_tables.py checks them.
GENERATED_TABLE = re.compile(r"(?P<head><!-- compare_experiments\.py (?P<flags>[^>]*?) -->\n)(?P<body>.*?)"
                             r"(?P<end><!-- end of generated table -->)", re.S)
FLAG_COLUMNS = ("architecture", "alpha_re", "alpha_p", "image_size", "batch_size")
RESULT_COLUMNS = ("best_mAP", "best_epoch", "last_mAP", "mAP_voc_at_best")
SHORT_HASH = 12  # hex digits of the best checkpoint's SHA-256 shown
COLUMNS = ("tag", "script", "strategy", *FLAG_COLUMNS, *RESULT_COLUMNS, "iterations", "total_iterations",
           "wall_time_s", "best_checkpoint")  # the CSV's
MARKDOWN_HEADERS = ("tag", "script / strategy", *FLAG_COLUMNS, *RESULT_COLUMNS, "iterations", "wall time",
                    "best checkpoint")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dir", default="experiments", help="the runs' output folder (holding data/)")
    p.add_argument("--baseline", nargs="+", default=[], metavar="GROUP",
                   help="groups to compare every other group against (e.g. puzzle none)")
    p.add_argument("--filter", nargs="+", default=None, metavar="TEXT",
                   help="only the runs whose tag contains TEXT (any of several: --filter @seed0 @seed1)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the validation images")
    p.add_argument("--bootstrap_seed", type=int, default=0)
    p.add_argument("--runs", action="store_true", help="one row per run instead of one per group")
    p.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also draw the groups' bars with their intervals "
                   "(with --runs: val mAP vs epoch); needs matplotlib")
    p.add_argument("--update_docs", nargs="+", default=None, metavar="FILE.md",
                   help="instead: regenerate every table in these files that stands between "
                   "'<!-- compare_experiments.py FLAGS -->' and '<!-- end of generated table -->' (FLAGS: this "
                   "tool's, paths relative to the repository)")
    return p


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_histories(folder: Path, contains: list[str] | None = None) -> list[dict]:
    """Every run history under folder/data, sorted by tag; evaluation outputs and unreadable files skipped."""
    data = folder / "data"
    if not data.is_dir():
        raise UserError(f"--dir {folder} has no data/ folder of run histories; pass the training --output_dir")
    histories = []
    for path in sorted(data.glob("*.json")):
        if "_eval_" in path.name:  # evaluate_classification.py results, not run histories
            continue
        if contains is not None and not any(text in path.stem for text in contains):
            continue
        try:
            history = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            warn(f"skipping {path}: not readable JSON ({type(exc).__name__})")
            continue
        if not isinstance(history, dict) or not isinstance(history.get("config"), dict):
            warn(f"skipping {path}: not a run history (no 'config')")
            continue
        history["config"].setdefault("tag", path.stem)
        histories.append(history)
    if not histories:
        which = f" whose tag contains {' or '.join(map(repr, contains))}" if contains is not None else ""
        raise UserError(f"no run histories{which} in {data}; train a run with --output_dir {folder} first")
    return sorted(histories, key=lambda h: str(h["config"]["tag"]))


def _records(history: dict, key: str) -> list[dict]:
    rows = history.get(key)
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_checkpoint_hash(history: dict, best: dict) -> str | None:
    """Short SHA-256 of the run's best checkpoint: the history's record of the file, else the best validation's."""
    recorded = history.get("checkpoint_sha256")
    sha = recorded.get("best") if isinstance(recorded, dict) else None
    if not isinstance(sha, str) and isinstance(best.get("checkpoints"), dict):
        sha = best["checkpoints"].get("best")
    return sha[:SHORT_HASH] if isinstance(sha, str) else None


def summarize(history: dict) -> dict:
    """One table row of a run history (None where the history lacks the value)."""
    config = history["config"]
    validation = [r for r in _records(history, "validation") if _number(r.get("mAP")) is not None]
    best = max(validation, key=lambda r: r["mAP"]) if validation else {}  # first of equal maxima, like the trainer
    done = [_number(r.get("iteration")) for r in _records(history, "train") + validation]
    done = [d for d in done if d is not None]
    return {
        "tag": config.get("tag"), "script": history.get("script"), "strategy": config.get("strategy"),
        **{key: config.get(key) for key in FLAG_COLUMNS}, "best_mAP": best.get("mAP"), "best_epoch": best.get("epoch"),
        "last_mAP": validation[-1]["mAP"] if validation else None, "mAP_voc_at_best": best.get("mAP_voc"),
        "iterations": int(max(done)) if done else None, "total_iterations": history.get("total_iterations"),
        "wall_time_s": _number(history.get("wall_time")), "best_checkpoint": best_checkpoint_hash(history, best),
    }


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(key: str, value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("best_mAP", "last_mAP", "mAP_voc_at_best"):
        return f"{value:.2f}"
    if key == "wall_time_s":
        return _duration(value)
    return str(value).replace("|", "\\|")  # a literal bar would split the markdown cell


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(MARKDOWN_HEADERS) + " |", "|" + "---|" * len(MARKDOWN_HEADERS)]
    for row in rows:
        done = _cell("iterations", row["iterations"])
        if row["total_iterations"] is not None:
            done += f"/{row['total_iterations']}"
        cells = [_cell("tag", row["tag"]), f"{_cell('script', row['script'])} / {_cell('strategy', row['strategy'])}"]
        cells += [_cell(c, row[c]) for c in (*FLAG_COLUMNS, *RESULT_COLUMNS)]
        cells += [done, _cell("wall_time_s", row["wall_time_s"]), _cell("best_checkpoint", row["best_checkpoint"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue().rstrip("\n")


def import_pyplot():
    """matplotlib.pyplot with a file-only backend, or a UserError: matplotlib is an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def plot_curves(plt, histories: list[dict], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for history in histories:
        points = [(r["epoch"], r["mAP"]) for r in _records(history, "validation")
                  if _number(r.get("epoch")) is not None and _number(r.get("mAP")) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=str(history["config"]["tag"]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:  # ValueError: an extension matplotlib cannot write
        raise UserError(f"--plot {out}: cannot write it ({exc})") from None
    finally:
        plt.close(fig)


def compare_runs(args: argparse.Namespace, histories: list[dict], plt) -> list[dict]:
    rows = [summarize(h) for h in histories]
    print(format_markdown(rows) if args.format == "markdown" else format_csv(rows))
    if plt is not None:
        plot_curves(plt, histories, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)  # stderr: keeps stdout a clean table/CSV
    return rows


def changes_from(config: dict, reference: dict) -> list[tuple]:
    """The compared flags in which `config` differs from `reference` (a flag either lacks counts as its default)."""
    return recipe_changes(config, reference, flag_defaults(bool(reference.get("demo"))))


def method_facts() -> MethodFacts:
    return MethodFacts(tuple(STRATEGIES), keypoint_strategies(), changes_from)


def compare(args: argparse.Namespace) -> list[dict]:
    if args.resamples < 100:
        raise UserError(f"--resamples must be at least 100 for a 95% interval, got {args.resamples}")
    plt = import_pyplot() if args.plot else None  # fail before any output when matplotlib is missing
    histories = read_histories(Path(args.dir), args.filter)
    if args.runs:
        return compare_runs(args, histories, plt)
    return compare_groups(args, histories, plt, method_facts())


def generated_table(flags: str) -> str:
    """What this tool prints for FLAGS (a markdown table and its footnote), run from the repository's folder."""
    argv = shlex.split(flags)
    args = build_parser().parse_args(argv)
    if args.format != "markdown" or args.plot or args.update_docs:
        raise UserError(f"generated table '{flags}': a table takes the markdown format, without --plot or "
                        "--update_docs")
    args = argparse.Namespace(**{**vars(args), "dir": str(REPO / args.dir)})  # an absolute --dir stays as it is
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compare(args)
    return out.getvalue()


def update_docs(paths: list[str]) -> None:
    for name in paths:
        path = Path(name)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"--update_docs {name}: cannot read it ({exc.strerror})") from None
        new = GENERATED_TABLE.sub(lambda m: m["head"] + generated_table(m["flags"]) + m["end"], text)
        count = len(GENERATED_TABLE.findall(text))
        if new != text:
            path.write_text(new)
        print(f"{name}: {count} generated table(s), {'updated' if new != text else 'unchanged'}")


def main(argv: list[str] | None = None) -> None:
    def go() -> None:
        args = build_parser().parse_args(argv)
        if args.update_docs:
            update_docs(args.update_docs)
        else:
            compare(args)

    run_cli(go)


if __name__ == "__main__":
    main()
