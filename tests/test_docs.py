"""The documentation against the code: docs/flags.md against the parser, every command line shown in
README.md and docs/*.md against the parser of the script it runs, and every relative link against the tree."""
from __future__ import annotations

import importlib
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

import flags_doc
from core.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("python", "python3", "torchrun")


def test_flags_page_matches_the_parser():
    page = (ROOT / "docs" / "flags.md").read_text()
    assert page == flags_doc.render(), f"docs/flags.md is out of date; regenerate it with: {flags_doc.REGENERATE}"


def test_extending_md_gives_the_steps_that_keep_the_flags_page_current():
    """A new strategy changes the page (its --strategy choices), and only scripts of the pattern are listed."""
    page = (ROOT / "docs" / "extending.md").read_text()
    assert f"`{flags_doc.REGENERATE}`" in page and f"`{flags_doc.SCRIPT_PATTERN}`" in page
    assert "tests/test_docs.py" in page


# ----------------------------------------------------------------------------- commands
def bash_commands(page: Path) -> list[tuple[int, str]]:
    """(line number, command) of every line of a ```bash block that starts with a launcher; `\\` continues."""
    commands, in_bash, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() == "bash"
            continue
        if not in_bash:
            continue
        if not pending:
            if stripped.split(" ", 1)[0] not in LAUNCHERS and not re.match(r"^[A-Z_]+=\S+ (python|torchrun)", stripped):
                continue
            start = number
        pending += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            commands.append((start, pending.strip()))
            pending = ""
    return commands


def script_and_argv(command: str) -> tuple[str, list[str]] | None:
    """(module name, argv) of a command that runs a repo script; None for other programs (pytest, pip)."""
    words = shlex.split(command, comments=True)
    for i, word in enumerate(words):  # the command ends where the shell takes over (background, pipe, redirect)
        if word in ("&", "&&", "|", ";", ">", ">>", "2>"):
            words = words[:i]
            break
    while words and re.match(r"^[A-Z_]+=", words[0]):  # environment assignments (OMP_NUM_THREADS=1 ...)
        words.pop(0)
    launcher, words = words[0], words[1:]
    if launcher == "torchrun":  # torchrun's own options come before the script
        while words and not words[0].endswith(".py"):
            words.pop(0)
    elif words and words[0] == "-m":
        module = words[1]
        if not (ROOT / Path(*module.split("."))).with_suffix(".py").is_file():
            return None  # python -m pytest, pip, ...
        return module, words[2:]
    script = words[0]
    assert (ROOT / script).is_file(), f"{script} is not a file of the repo"
    return script.removesuffix(".py").replace("/", "."), words[1:]


DOC_COMMANDS = [(page, line, command) for page in PAGES for line, command in bash_commands(page)]


def test_the_pages_show_commands():
    assert len(DOC_COMMANDS) >= 20 and any(page.name == "README.md" for page, _, _ in DOC_COMMANDS)


@pytest.mark.parametrize("page,line,command", DOC_COMMANDS,
                         ids=[f"{page.name}:{line}" for page, line, _ in DOC_COMMANDS])
def test_every_command_shown_parses(page, line, command):
    """Parsing only: a training script's flags through core.config.build_parser(DEFAULTS), a tool's through its
    build_parser(); nothing is validated against the disk, so placeholders like $your_dir are fine."""
    found = script_and_argv(command)
    if found is None:
        return
    module_name, argv = found
    module = importlib.import_module(module_name)
    if hasattr(module, "DEFAULTS"):
        parser = build_parser(module.DEFAULTS)
    else:
        assert hasattr(module, "build_parser"), f"{page.name}:{line}: {module_name} has no parser to check against"
        parser = module.build_parser()
    try:
        if module_name == "benchmarks.train_speed":  # it passes unknown flags on to the trainer's parser
            _, extra = parser.parse_known_args(argv)
            build_parser({"strategy": "ctopk_w"}).parse_args(["--demo", *extra])
        elif module_name == "run_experiments":  # the same: its unknown flags go to every run
            _, extra = parser.parse_known_args(argv)
            build_parser({}).parse_args(extra)
        else:
            parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page.relative_to(ROOT)}:{line}: `{command}` does not parse (exit {exc.code})")


# ----------------------------------------------------------------------------- links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_relative_link_points_to_a_file_and_heading():
    broken = []
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_tools_stay_below_core():
    """tools/ (data, metrics, files, statistics) is the lower layer: no module of it imports core/."""
    import ast

    for path in sorted((ROOT / "tools").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "core" or n.startswith("core.") for n in names), f"{path.name} imports {names}"
