"""The published results against their raw data: every table that compare_experiments.py generated into
README.md or docs/ is regenerated from the score files and histories under res/ and must come out the same,
and every shipped history was trained by the command its regime documents (docs/miniature.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_docs import PAGES, bash_commands, script_and_argv

import compare_experiments
import run_experiments
from core.config import parse_args
from core.recipe import flag_defaults, recipe_changes

ROOT = Path(__file__).resolve().parents[1]
REGIMES = ROOT / "res" / "regimes"
STUDY = ROOT / "docs" / "miniature.md"

TABLES = [(page, match["flags"], match["body"]) for page in PAGES
          for match in compare_experiments.GENERATED_TABLE.finditer(page.read_text())]


def test_the_results_are_generated_tables():
    pages = {page.name for page, _, _ in TABLES}
    assert {"README.md", "miniature.md"} <= pages, pages
    for _, flags, _ in TABLES:
        assert "--dir res/" in flags, f"a published table reads the shipped data under res/, not {flags}"


@pytest.mark.parametrize("page,flags,body", TABLES, ids=[f"{p.name}:{f}" for p, f, _ in TABLES])
def test_each_published_table_regenerates_exactly(page, flags, body):
    assert compare_experiments.generated_table(flags) == body, (
        f"{page.name}: the table under '{flags}' differs from what its data gives; regenerate it with "
        f"python compare_experiments.py --update_docs {page.relative_to(ROOT)}")


def regime_commands() -> dict[str, list[list[str]]]:
    """{regime: [argv of run_experiments.py, ...]} from docs/miniature.md; the regime is its --output_dir's name."""
    regimes: dict[str, list[list[str]]] = {}
    for _, command in bash_commands(STUDY):
        found = script_and_argv(command)
        if found is None or found[0] != "run_experiments":
            continue
        argv = found[1]
        output_dir = Path(argv[argv.index("--output_dir") + 1])
        assert output_dir.parent == Path("experiments/regimes"), command
        regimes.setdefault(output_dir.name, []).append(argv)
    return regimes


def planned_configs(argv: list[str]) -> dict[str, dict]:
    """{tag: config} of the runs one run_experiments.py command makes (as its plan() does, without the disk)."""
    args, passthrough = run_experiments.build_parser().parse_known_args(argv)
    planned = {}
    for name in args.scripts:
        script = run_experiments.resolve_script(name)
        defaults = run_experiments.script_defaults(script)
        for seed in args.seeds:
            probe = parse_args(defaults, [*passthrough, "--seed", str(seed)])
            tag = f"{args.prefix or ('demo' if probe.demo else 'exp')}@{probe.strategy}@seed{seed}"
            config = vars(parse_args(defaults, [*passthrough, "--seed", str(seed), "--tag", tag]))
            planned[tag] = {"config": config, "script": script.name}
    return planned


SHIPPED = sorted(p.name for p in REGIMES.iterdir() if p.is_dir()) if REGIMES.is_dir() else []


def test_every_shipped_regime_is_documented_and_published():
    commands = regime_commands()
    assert SHIPPED and set(SHIPPED) <= set(commands), (SHIPPED, sorted(commands))
    published = " ".join(flags for _, flags, _ in TABLES)
    for regime in SHIPPED:
        assert f"--dir res/regimes/{regime} " in published + " ", f"res/regimes/{regime} has no published table"


@pytest.mark.parametrize("regime", SHIPPED)
def test_each_shipped_history_was_trained_by_its_regime_command(regime):
    planned = {}
    for argv in regime_commands()[regime]:
        planned.update(planned_configs(argv))
    data = REGIMES / regime / "data"
    shipped = {p.stem: json.loads(p.read_text()) for p in sorted(data.glob("*.json"))}
    assert sorted(shipped) == sorted(planned), f"res/regimes/{regime}: shipped runs differ from the command's"
    for tag, history in shipped.items():
        saved, wanted = history["config"], planned[tag]["config"]
        changes = [(name, old, new) for name, old, new in recipe_changes(saved, wanted, flag_defaults(True))
                   if new not in (None, "auto")]
        assert not changes and saved["tag"] == tag, f"{regime}/{tag}: {changes}"
        assert history["script"] == planned[tag]["script"]
        assert history["finished_iteration"] == history["total_iterations"] > 0, f"{regime}/{tag} did not finish"
        assert (data / f"{tag}_val_scores.npz").is_file()


# ----------------------------------------------------------------------------- bad input on shipped folders
def test_update_docs_rewrites_a_stale_table(tmp_path, capsys):
    page, flags, body = next(t for t in TABLES if t[0].name == "miniature.md")
    stale = tmp_path / "page.md"
    stale.write_text(f"text\n<!-- compare_experiments.py {flags} -->\n| stale |\n<!-- end of generated table -->\n")
    assert compare_experiments.main(["--update_docs", str(stale)]) is None
    end = "<!-- end of generated table -->"
    assert stale.read_text() == f"text\n<!-- compare_experiments.py {flags} -->\n{body}{end}\n"
    assert "1 generated table(s), updated" in capsys.readouterr().out


def test_a_shipped_folder_mixing_recipes_is_refused(tmp_path, capsys):
    import shutil

    from tool_calls import call

    folder = Path(shutil.copytree(REGIMES / SHIPPED[0] / "data", tmp_path / "mixed" / "data"))
    history_path = sorted(folder.glob("*@ctopk_w@seed1.json"))[0]
    history = json.loads(history_path.read_text())
    history["config"]["reference_gpus"] = 2
    history_path.write_text(json.dumps(history))
    code, out, err = call(compare_experiments.main, ["--dir", folder.parent, "--baseline", "none"], capsys)
    assert code == 2 and not out and "group ctopk_w mixes recipes" in err and "--reference_gpus" in err, err
    shutil.rmtree(folder)
    folder.mkdir()
    code, _, err = call(compare_experiments.main, ["--dir", folder.parent], capsys)
    assert code == 2 and "no run histories" in err and len(err.strip().splitlines()) == 1, err



# ----------------------------------------------------------------------------- an independent recomputation
SCORE_FILES = sorted(REGIMES.glob("*/data/*_val_scores.npz")) if REGIMES.is_dir() else []


@pytest.mark.parametrize("path", SCORE_FILES, ids=[f"{p.parents[1].name}/{p.name}" for p in SCORE_FILES])
def test_each_shipped_score_file_gives_its_mAP_by_scikit_learn(path):
    """scikit-learn's AP gives each shipped run's logged mAP. It treats a tie as one threshold where the
    reference AP keeps tied images in list order (tools/metrics.py); ranking the tied scores by that order
    first makes every score distinct, and then the two must agree exactly."""
    from sklearn.metrics import average_precision_score

    saved = np.load(path)
    scores, labels = saved["scores"], saved["labels"]
    history = json.loads(path.with_name(path.name.replace("_val_scores.npz", ".json")).read_text())
    best = max(v["mAP"] for v in history["validation"])
    classes = [c for c in range(labels.shape[1]) if labels[:, c].any()]
    ranks = np.empty(scores.shape)
    for c in classes:
        order = np.lexsort((np.arange(len(scores)), -scores[:, c]))  # by score, then list order
        ranks[order, c] = -np.arange(len(scores))
    in_order = 100 * np.mean([average_precision_score(labels[:, c], ranks[:, c]) for c in classes])
    assert in_order == pytest.approx(best, abs=1e-9) and float(saved["mAP"]) == pytest.approx(best, abs=1e-9)
    for c in classes:
        if len(np.unique(scores[:, c])) == len(scores):  # no tie: the raw scores give the same AP
            raw = average_precision_score(labels[:, c], scores[:, c])
            assert raw == pytest.approx(average_precision_score(labels[:, c], ranks[:, c]), abs=1e-12)
