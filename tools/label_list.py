"""A researcher's own data: classes.txt plus one CSV per split of `image_path,label;label;...` lines.

    ROOT/classes.txt     one class name per line (blank lines ignored)
    ROOT/train.csv       image,labels                      <- optional header
                         images/0001.jpg,dog;person
                         images/0002.jpg,                   <- an image without labels
    ROOT/val.csv

Image paths are relative to ROOT (absolute ones are used as they are); a path holding a comma is
quoted, CSV-style. A split is NAME (ROOT/NAME.csv) or a path to a .csv file.
"""
from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.errors import UserError

CLASSES_FILE = "classes.txt"
LINE_FORMAT = "'image_path,label;label;...'"
_SHOW = 5


@dataclass
class ListSplit:
    source: Path
    paths: list[str]  # as written in the file
    line_numbers: list[int]
    labels: np.ndarray  # (n, C) float32


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # text mode folds CRLF; -sig drops a BOM
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc})") from None


def read_class_names(root: Path) -> tuple[str, ...]:
    """The classes of ROOT/classes.txt, in file order; repeated or unusable names are errors."""
    path = Path(root) / CLASSES_FILE
    names = [line.strip() for line in _read_text(path, "write one class name per line").splitlines()]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"{path} lists no class; write one class name per line")
    for name in names:
        if any(c in name for c in ",;\""):
            raise UserError(f"{path}: class {name!r} contains ',', ';' or '\"', which the split files use as "
                            f"separators; rename it")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{path}: class {repeated[0]!r} is listed more than once; keep one line per class")
    return tuple(names)


def available_splits(root: Path) -> str:
    names = sorted(p.stem for p in Path(root).glob("*.csv"))
    return f"available: {', '.join(names) or 'none'} (the .csv files in {root}), or a path to a .csv file"


def split_file(root: Path, split: str) -> Path:
    """ROOT/NAME.csv for a name, the file itself for a path."""
    if split.endswith(".csv") or os.sep in split:
        path = Path(split).expanduser()
        if not path.is_absolute() and not path.is_file():
            path = Path(root) / path
        if not path.is_file():
            raise UserError(f"split file {split} does not exist; {available_splits(root)}")
        return path
    path = Path(root) / f"{split}.csv"
    if not path.is_file():
        raise UserError(f"unknown split {split!r}: {path} does not exist; {available_splits(root)}")
    return path


def _is_header(row: list[str]) -> bool:
    return [c.strip().lower() for c in row] == ["image", "labels"]


def _parse_row(row: list[str], where: str, class_index: dict[str, int]) -> tuple[str, list[int]]:
    """(image path, class indices) of one CSV row, or a UserError naming the line."""
    if len(row) != 2 or not row[0].strip():
        got = "an empty image path" if len(row) == 2 else f"{len(row)} field{'s' * (len(row) != 1)}"
        raise UserError(f"{where}: malformed line, expected {LINE_FORMAT} (2 comma-separated fields), got {got}; "
                        f"quote a path that holds a comma")
    names = [n.strip() for n in row[1].split(";") if n.strip()]
    unknown = [n for n in names if n not in class_index]
    if unknown:
        shown = ", ".join(list(class_index)[:10]) + (", ..." if len(class_index) > 10 else "")
        raise UserError(f"{where}: unknown class {unknown[0]!r}; {CLASSES_FILE} lists {len(class_index)} "
                        f"classes ({shown}); fix the label or add the class to {CLASSES_FILE}")
    return row[0].strip(), [class_index[n] for n in names]


def _missing_images(root: Path, paths: list[str]) -> list[int]:
    """Positions of the paths with no file, listing each folder once instead of one stat per image."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for i, rel in enumerate(paths):
        full = Path(root) / rel
        if full.parent not in listings:
            try:
                listings[full.parent] = set(os.listdir(full.parent))
            except OSError:
                listings[full.parent] = set()
        if full.name not in listings[full.parent]:
            missing.append(i)
    return missing


def read_list_split(root: Path, split: str, class_names: tuple[str, ...],
                    problems: list[str] | None = None) -> ListSplit:
    """Parse a split file and check that its images exist.

    With `problems` (a list), each broken line or missing image is appended to it as one line and
    left out; without, the first problem raises UserError.
    """
    source = split_file(root, split)
    class_index = {name: i for i, name in enumerate(class_names)}
    text = _read_text(source, "write one line per image")
    paths, lines, rows = [], [], []
    for number, row in enumerate(csv.reader(text.splitlines()), 1):
        if not any(c.strip() for c in row) or (not paths and not rows and _is_header(row)):
            continue
        try:
            path, classes = _parse_row(row, f"{source.name} line {number}", class_index)
        except UserError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            continue
        paths.append(path)
        lines.append(number)
        rows.append(classes)
    missing = _missing_images(root, paths)
    named = [f"line {lines[i]} {paths[i]}" for i in missing]
    if missing and problems is None:
        more = ", ..." if len(missing) > _SHOW else ""
        raise UserError(f"{source.name}: {len(missing)} of {len(paths)} images do not exist under {root}: "
                        f"{', '.join(named[:_SHOW])}{more}; fix the paths (relative to the data folder)")
    if problems is not None and missing:
        problems.extend(f"{source.name} {m}: image file does not exist" for m in named)
        keep = sorted(set(range(len(paths))) - set(missing))
        paths, lines, rows = [paths[i] for i in keep], [lines[i] for i in keep], [rows[i] for i in keep]
    return ListSplit(source, *_dedupe(source, paths, lines, rows, len(class_names)))


def _dedupe(source: Path, paths: list[str], lines: list[int], rows: list[list[int]],
            num_classes: int) -> tuple[list[str], list[int], np.ndarray]:
    """Drop repeated image paths (a val image counted twice would skew every metric), with one warning."""
    first: dict[str, int] = {}
    for i, path in enumerate(paths):
        first.setdefault(path, i)
    if len(first) < len(paths):
        warnings.warn(f"{source}: dropped {len(paths) - len(first)} repeated image paths", stacklevel=3)
    keep = sorted(first.values())
    labels = np.zeros((len(keep), num_classes), np.float32)
    for row, i in enumerate(keep):
        labels[row, rows[i]] = 1.0
    return [paths[i] for i in keep], [lines[i] for i in keep], labels
