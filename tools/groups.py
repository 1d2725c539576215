"""Groups of runs (a strategy's seeds) for compare_experiments.py: their summaries and paired bootstraps."""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools.bootstrap import BootstrapResult, paired_bootstrap, resample_indices, run_maps
from tools.errors import UserError
from tools.metrics import mean_average_precision

METRICS = ("mAP", "mAP_voc", "CF1", "OF1", "pointing_game", "hit_rate", "hit_rate_first", "tied_scores",
           "wall_time")
HEADERS = {"mAP": "best mAP", "mAP_voc": "mAP_voc", "CF1": "CF1", "OF1": "OF1", "pointing_game": "pointing game",
           "hit_rate": "hit rate", "hit_rate_first": "hit rate (1st val)", "tied_scores": "tied scores (%)",
           "wall_time": "wall time (s)"}


@dataclass(frozen=True)
class MethodFacts:
    """What grouping runs needs to know about the method; the caller (compare_experiments.py) reads it from
    core/, which tools/ does not import."""

    strategy_order: tuple[str, ...]  # the registry's order: baselines, OASS, plug-ins
    keypoint_strategies: tuple[str, ...]  # the strategies whose own hit rate a run logs
    recipe_changes: Callable[[dict, dict], list[tuple]]  # (config, reference config) -> [(flag, value, reference)]


@dataclass
class RunScores:
    """A run's saved best-validation scores (data/<tag>_val_scores.npz)."""

    image_ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class Group:
    name: str
    histories: list[dict]
    metrics: list[dict] = field(default_factory=list)  # per run, at its best validation
    scores: list[RunScores] = field(default_factory=list)  # the runs that saved them
    scored_tags: list[str] = field(default_factory=list)  # the tags of `scores`, in order
    resampled: list[np.ndarray] = field(default_factory=list)  # per run in `scores`: mAP on each resample

    @property
    def seeds(self) -> list[int]:
        return [h["config"].get("seed") for h in self.histories]


def _number(value: object) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok else math.nan


def run_metrics(history: dict, keypoint_strategies: tuple[str, ...]) -> dict:
    """The run's best validation (first of equal maxima, like the trainer) and its own keypoint hit rate there
    and at the first validation (NaN for strategies without keypoints or runs without boxes)."""
    validation = [r for r in history.get("validation") or [] if isinstance(r, dict) and not math.isnan(
        _number(r.get("mAP")))]
    if not validation:
        return {key: math.nan for key in METRICS}  # wall time too: a run without a validation has no result
    best = max(validation, key=lambda r: r["mAP"])
    strategy = history["config"].get("strategy")
    hit = f"hit_rate_{strategy}" if strategy in keypoint_strategies else None
    out = {key: _number(best.get(key)) for key in ("mAP", "mAP_voc", "CF1", "OF1", "pointing_game")}
    out["hit_rate"] = _number(best.get(hit)) if hit else math.nan
    out["hit_rate_first"] = _number(validation[0].get(hit)) if hit else math.nan
    out["tied_scores"] = math.nan  # from the score file (load_scores)
    out["wall_time"] = _number(history.get("wall_time"))
    return out


def tied_share(scores: np.ndarray) -> float:
    """Percent of the (image, class) scores that equal another image's score of the same class. A tie makes
    AP depend on the image order (tools/metrics.py); a class scored the same on every image carries no ranking."""
    tied = 0
    for column in scores.T:
        counts = np.unique(column, return_counts=True)[1]
        tied += int(counts[counts > 1].sum())
    return 100.0 * tied / scores.size


def make_groups(histories: list[dict], facts: MethodFacts) -> list[Group]:
    """One group per strategy, in the registry's order (baselines first, then OASS, then plug-ins; unknown names
    last, by name); a group mixing recipes is refused."""
    by_name: dict[str, list[dict]] = {}
    for history in histories:
        by_name.setdefault(str(history["config"].get("strategy")), []).append(history)
    registered = list(facts.strategy_order)
    order = sorted(by_name, key=lambda n: (registered.index(n) if n in registered else len(registered), n))
    groups = [Group(name, by_name[name]) for name in order]
    for group in groups:
        check_one_recipe(group, facts.recipe_changes)
        group.metrics = [run_metrics(h, facts.keypoint_strategies) for h in group.histories]
    return groups


ONE_AT_A_TIME = "--filter TEXT keeps the tags containing TEXT, or use separate --output_dir folders"


def finished_length(history: dict) -> int | None:
    """The iteration the run stopped at: its finished_iteration, else (a run stopped or still going) the last
    one its history records. --max_iterations is free on --resume, but a run stopped earlier is another result."""
    finished = history.get("finished_iteration")
    if isinstance(finished, int) and not isinstance(finished, bool):
        return finished
    done = [r.get("iteration") for key in ("train", "validation") for r in history.get(key) or []
            if isinstance(r, dict)]
    done = [d for d in done if isinstance(d, int) and not isinstance(d, bool)]
    return max(done) if done else None


def _tags(histories: list[dict]) -> str:
    tags = [str(h["config"].get("tag")) for h in histories]
    return ", ".join(tags[:-1]) + " and " + tags[-1] if len(tags) > 1 else tags[0]


def check_one_recipe(group: Group, recipe_changes: Callable[[dict, dict], list[tuple]]) -> None:
    """Refuse a group whose runs differ in anything but the seed (or the flags that never change a result),
    that mixes finished lengths, or that holds a seed twice: its mean ± std and bootstrap would be over
    different results, or count one seed twice."""
    first = group.histories[0]["config"]
    for history in group.histories[1:]:
        other = history["config"]
        changes = [c for c in recipe_changes(other, first) if c[0] != "seed"]
        if changes:
            flags = ", ".join(f"--{name} ({old} vs {new})" for name, new, old in changes)
            raise UserError(f"group {group.name} mixes recipes: runs {first.get('tag')} and {other.get('tag')} differ "
                            f"in {flags}; compare one recipe at a time ({ONE_AT_A_TIME})")
    by_length: dict[int | None, list[dict]] = {}
    for history in group.histories:
        by_length.setdefault(finished_length(history), []).append(history)
    if len(by_length) > 1:
        lengths = "; ".join(f"{_tags(runs)} at {'no iteration' if at is None else f'iteration {at}'}"
                            for at, runs in sorted(by_length.items(), key=lambda item: (item[0] is None, item[0] or 0)))
        raise UserError(f"group {group.name} mixes run lengths: {lengths} (a run stopped earlier is another result); "
                        f"compare one length at a time ({ONE_AT_A_TIME}), or continue the shorter runs with --resume "
                        "and a larger --max_iterations")
    by_seed: dict[object, list[dict]] = {}
    for history in group.histories:
        by_seed.setdefault(history["config"].get("seed"), []).append(history)
    repeated = {seed: runs for seed, runs in by_seed.items() if len(runs) > 1}
    if repeated:
        seeds = "; ".join(f"seed {seed} in {_tags(runs)}" for seed, runs in repeated.items())
        raise UserError(f"group {group.name} holds a seed twice: {seeds} (one seed counted twice is not a spread over "
                        f"seeds); keep one run per seed ({ONE_AT_A_TIME})")


def load_scores(folder: Path, group: Group) -> None:
    """The per-image scores each run of the group saved at its best validation (data/<tag>_val_scores.npz).
    A missing file, or one that is not the evidence of its history's best validation (another mAP, another
    class count), is refused: an interval over fewer runs than the table's would not be the table's."""
    for history, metrics in zip(group.histories, group.metrics):
        tag = history["config"]["tag"]
        path = folder / "data" / f"{tag}_val_scores.npz"
        fix = f"put the run's own {path.name} beside {tag}.json, or leave the run out (--filter)"
        try:
            with np.load(path, allow_pickle=False) as saved:
                run = RunScores(saved["image_ids"], saved["scores"].astype(np.float64),
                                saved["labels"].astype(np.float64))
                saved_map = float(saved["mAP"]) if "mAP" in saved.files else None
        except FileNotFoundError:
            raise UserError(f"{tag}: no per-image scores ({path}); {fix}") from None
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{tag}: {path} is not a per-image score file ({type(exc).__name__}); {fix}") from None
        classes = history.get("class_names")
        problem = None
        if run.scores.ndim != 2 or run.labels.shape != run.scores.shape or len(run.image_ids) != len(run.scores):
            problem = (f"scores {run.scores.shape}, labels {run.labels.shape} and {len(run.image_ids)} image ids "
                       "disagree")
        elif isinstance(classes, list) and run.scores.shape[1] != len(classes):
            problem = f"{run.scores.shape[1]} classes where the history has {len(classes)}"
        elif saved_map is not None and not math.isclose(saved_map, metrics["mAP"], abs_tol=1e-6):
            problem = f"mAP {saved_map:.4f} where the history's best validation has {metrics['mAP']:.4f}"
        if problem:
            raise UserError(f"{tag}: {path.name} does not match its history ({problem}); {fix}")
        metrics["tied_scores"] = tied_share(run.scores)
        group.scores.append(run)
        group.scored_tags.append(tag)


def check_same_images(groups: list[Group]) -> None:
    """A paired bootstrap needs every run scored on the same images, in the same order, with the same labels."""
    scored = [(tag, s) for g in groups for tag, s in zip(g.scored_tags, g.scores)]
    first_tag, first = scored[0]
    for tag, run in scored[1:]:
        if run.image_ids.shape != first.image_ids.shape or (run.image_ids != first.image_ids).any():
            what = "other validation images"
        elif run.labels.shape != first.labels.shape or (run.labels != first.labels).any():
            what = "other labels"
        else:
            continue
        raise UserError(f"{tag} was validated on {what} than {first_tag}: no paired comparison between them; "
                        "compare runs of one validation set (--filter TEXT, or separate --dir folders)")


def bootstrap_all(groups: list[Group], baselines: list[str], resamples: int,
                  seed: int) -> dict[tuple[str, str], BootstrapResult]:
    """{(group, baseline): result} for every group against every baseline, on one set of resampled images."""
    check_same_images(groups)
    reference = groups[0].scores[0]
    indices = resample_indices(len(reference.image_ids), resamples, seed)
    for group in groups:
        group.resampled = [run_maps(s.scores, s.labels, indices) for s in group.scores]
    full = {g.name: [mean_average_precision(s.scores, s.labels)[0] for s in g.scores] for g in groups}
    results = {}
    for base in baselines:
        baseline = next(g for g in groups if g.name == base)
        for group in groups:
            if group is baseline:
                continue
            results[(group.name, base)] = paired_bootstrap(full[group.name], group.resampled, full[base],
                                                           baseline.resampled)
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return float(np.mean(finite)), float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def _pm(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def group_rows(groups: list[Group], baselines: list[str], results: dict) -> list[dict]:
    rows = []
    for group in groups:
        row = {"group": group.name, "runs": len(group.histories), "seeds": " ".join(map(str, group.seeds)),
               "scored_runs": len(group.scores)}
        for key in METRICS:
            row[f"{key}_mean"], row[f"{key}_std"] = mean_std([m[key] for m in group.metrics])
        for base in baselines:
            result = results.get((group.name, base))
            row[f"delta_vs_{base}"] = result.delta if result else math.nan
            row[f"ci_low_vs_{base}"] = result.low if result else math.nan
            row[f"ci_high_vs_{base}"] = result.high if result else math.nan
            row[f"share_above_0_vs_{base}"] = result.share_above_zero if result else math.nan
        rows.append(row)
    return rows


def format_group_markdown(rows: list[dict], baselines: list[str]) -> str:
    headers = ["group", "runs", *(HEADERS[k] for k in METRICS)]
    headers += [h for b in baselines for h in (f"ΔmAP vs {b} [95% CI]", f"P(Δ>0) vs {b}")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["group"], str(row["runs"])] + [_pm(row[f"{k}_mean"], row[f"{k}_std"], 0 if k == "wall_time" else 2)
                                                       for k in METRICS]
        for base in baselines:
            delta = row[f"delta_vs_{base}"]
            if math.isnan(delta):
                cells += ["-", "-"]
            else:
                cells += [f"{delta:+.2f} [{row[f'ci_low_vs_{base}']:+.2f}, {row[f'ci_high_vs_{base}']:+.2f}]",
                          f"{row[f'share_above_0_vs_{base}']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_group_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                     for row in rows)
    return out.getvalue().rstrip("\n")


def plot_groups(plt, rows: list[dict], baselines: list[str], out: Path) -> None:
    """Left: each group's mean best mAP with ± std over seeds. Right: ΔmAP against the first baseline with its
    95% bootstrap interval."""
    panels = 2 if baselines else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels + 1, 4), squeeze=False)
    names = [r["group"] for r in rows]
    means = [r["mAP_mean"] for r in rows]
    stds = [0.0 if math.isnan(r["mAP_std"]) else r["mAP_std"] for r in rows]
    ax = axes[0][0]
    ax.bar(names, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel("best val mAP (%), mean ± std over seeds")
    ax.set_ylim(min(means) - 3 * max(stds + [1.0]), max(means) + 3 * max(stds + [1.0]))
    ax.grid(axis="y", alpha=0.3)
    if baselines:
        base = baselines[0]
        kept = [r for r in rows if not math.isnan(r[f"delta_vs_{base}"])]
        deltas = [r[f"delta_vs_{base}"] for r in kept]
        errors = [[d - r[f"ci_low_vs_{base}"] for d, r in zip(deltas, kept)],
                  [r[f"ci_high_vs_{base}"] - d for d, r in zip(deltas, kept)]]
        ax = axes[0][1]
        ax.bar([r["group"] for r in kept], deltas, yerr=errors, capsize=4,
               color=["tab:green" if d > 0 else "tab:red" for d in deltas], alpha=0.8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"ΔmAP vs {base} (points), 95% paired bootstrap")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[0]:
        ax.tick_params(axis="x", rotation=30)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, bbox_inches="tight")
    except (OSError, ValueError) as exc:
        raise UserError(f"--plot {out}: cannot write it ({exc})") from None
    finally:
        plt.close(fig)


def compare_groups(args: argparse.Namespace, histories: list[dict], plt, facts: MethodFacts) -> list[dict]:
    groups = make_groups(histories, facts)
    names = [g.name for g in groups]
    unknown = [b for b in args.baseline if b not in names]
    if unknown:
        raise UserError(f"--baseline {unknown[0]} names no group here; the groups are: {', '.join(names)}")
    results = {}
    if args.baseline:
        for group in groups:
            load_scores(Path(args.dir), group)
        results = bootstrap_all(groups, args.baseline, args.resamples, args.bootstrap_seed)
    rows = group_rows(groups, args.baseline, results)
    if args.format == "markdown":
        print(format_group_markdown(rows, args.baseline))
        if results:
            images = next(len(g.scores[0].image_ids) for g in groups if g.scores)
            print(f"\nΔ: paired bootstrap over the {images} validation images ({args.resamples} resamples, seed "
                  f"{args.bootstrap_seed}), each group's seeds averaged; ± is the std over seeds.")
    else:
        print(format_group_csv(rows))
    if plt is not None:
        plot_groups(plt, rows, args.baseline, Path(args.plot))
        print(f"wrote {args.plot}", file=sys.stderr)
    return rows
