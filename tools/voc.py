"""PASCAL VOC (2012 and 2007) for multi-label classification: folders, split lists, XML labels, Dataset.

Everything a user can get wrong (a path, a split name, a broken file) raises `UserError` with one
sentence that says what was found and what was expected.
"""
from __future__ import annotations

import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.errors import UserError
from tools.images import (  # BadImageError and load_rgb_image moved there; importable from here still
    BadImageError,  # noqa: F401
    MultiLabelImages,
    Transform,
    load_rgb_image,  # noqa: F401
    short_name,
)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
NUM_CLASSES = 20
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(VOC_CLASSES)}
REPO_DATA_DIR = Path(__file__).resolve().parent.parent / "data"

# Files in data/ that are not split lists.
_NOT_SPLITS = frozenset({"class_names"})
VOC_YEARS = ("2012", "2007")


def _root_hint(year: str = "2012") -> str:
    return f"point it at VOCdevkit/VOC{year} (the folder holding JPEGImages/ and Annotations/)"

_SHOW_IDS = 5


@dataclass(frozen=True)
class VOCObject:
    name: str
    box: tuple[int, int, int, int]  # xmin, ymin, xmax, ymax as written in the XML (1-based, inclusive)
    difficult: bool


@dataclass(frozen=True)
class Annotation:
    labels: np.ndarray  # float32 (20,): 1 for each class with at least one object
    difficult_only: np.ndarray  # bool (20,): every object of that class is difficult
    objects: tuple[VOCObject, ...]


@dataclass
class VOCSplit:
    name: str
    ids: list[str]
    annotations: list[Annotation] | None  # None: the split has no annotation file at all
    source: Path


# ----------------------------------------------------------------------------------------------
# XML annotations


def _unknown_class_message(where: str, name: str) -> str:
    return (f"{where}: unknown class {name!r}; expected one of the {NUM_CLASSES} VOC classes "
            f"({', '.join(VOC_CLASSES)})")


def _int_field(element: ET.Element, tag: str, where: str) -> int:
    text = element.findtext(tag)
    try:
        # Some VOC files write coordinates like "273.5"; the reference truncated them.
        return int(float(text.strip()))  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        raise UserError(f"{where}: malformed XML (<{tag}> is {text!r}, expected a number)") from None


def _image_size(root: ET.Element, where: str) -> tuple[int, int] | None:
    size = root.find("size")
    if size is None or size.find("width") is None or size.find("height") is None:
        return None
    width, height = _int_field(size, "width", where), _int_field(size, "height", where)
    return (width, height) if width > 0 and height > 0 else None


def _parse_object(obj: ET.Element, where: str, size: tuple[int, int] | None) -> VOCObject | None:
    """One <object>; None for a zero-area box, which the reference dropped."""
    name = (obj.findtext("name") or "").strip()
    if not name:
        raise UserError(f"{where}: malformed XML (an <object> has no <name>)")
    if name not in CLASS_INDEX:
        raise UserError(_unknown_class_message(where, name))
    box_el = obj.find("bndbox")
    if box_el is None:
        raise UserError(f"{where}: malformed XML (object {name!r} has no <bndbox>)")
    xmin, ymin, xmax, ymax = (_int_field(box_el, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax"))
    if size is not None:
        # The reference clamped boxes into the image before testing for zero area.
        xmin, xmax = (min(max(v, 0), size[0] - 1) for v in (xmin, xmax))
        ymin, ymax = (min(max(v, 0), size[1] - 1) for v in (ymin, ymax))
    if xmax <= xmin or ymax <= ymin:
        return None
    difficult_text = (obj.findtext("difficult") or "0").strip()
    return VOCObject(name, (xmin, ymin, xmax, ymax), difficult_text not in ("0", ""))


def parse_annotation(xml_path: Path) -> Annotation:
    """Labels of one VOC XML file: the set of object names (difficult objects count as positives)."""
    xml_path = Path(xml_path)
    where = short_name(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise UserError(f"{where}: malformed XML ({exc})") from None
    except OSError as exc:
        raise UserError(f"{where}: cannot read annotation ({exc.strerror or exc})") from None
    size = _image_size(root, where)
    objects = [o for o in (_parse_object(el, where, size) for el in root.findall("object")) if o is not None]
    labels = np.zeros(NUM_CLASSES, dtype=np.float32)
    has_easy = np.zeros(NUM_CLASSES, dtype=bool)
    for obj in objects:
        labels[CLASS_INDEX[obj.name]] = 1.0
        has_easy[CLASS_INDEX[obj.name]] |= not obj.difficult
    return Annotation(labels=labels, difficult_only=(labels > 0) & ~has_easy, objects=tuple(objects))


# ----------------------------------------------------------------------------------------------
# Dataset root


def list_entries(folder: Path, limit: int = 6) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "cannot be listed"
    if not names:
        return "it is empty"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return "it contains " + ", ".join(names[:limit]) + more


def is_voc_folder(folder: Path) -> bool:
    return (folder / "JPEGImages").is_dir() and (folder / "Annotations").is_dir()


def voc_candidates(path: Path, year: str = "2012") -> tuple[Path, ...]:
    """Where a VOC folder of `year` may sit under --data_dir: the folder itself, VOCdevkit/VOCyyyy, VOCyyyy."""
    return path, path / "VOCdevkit" / f"VOC{year}", path / f"VOC{year}"


def wrong_root_message(path: Path, year: str) -> str:
    flag, hint = f"--data_dir {path}", _root_hint(year)
    if path.name in ("JPEGImages", "Annotations", "ImageSets"):
        return f"{flag} is the {path.name}/ folder itself; pass its parent {path.parent} instead"
    for candidate in voc_candidates(path, year):
        has_images, has_xml = (candidate / "JPEGImages").is_dir(), (candidate / "Annotations").is_dir()
        if has_images != has_xml:
            missing = "Annotations/" if has_images else "JPEGImages/"
            return f"{flag}: {candidate} has no {missing} folder; {hint}"
    if (path / "VOCdevkit").is_dir():
        return (f"{flag} has VOCdevkit/ but no VOCdevkit/VOC{year}/ with JPEGImages/ and Annotations/ "
                f"({list_entries(path / 'VOCdevkit')}); {hint}")
    return f"{flag} has no JPEGImages/ folder ({list_entries(path)}); {hint}"


def resolve_voc_root(data_dir: str | Path, year: str = "2012") -> Path:
    """The VOC folder of `year`, given it, its VOCdevkit/ parent's parent, or a folder holding VOCyyyy/."""
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise UserError(f"--data_dir {path} does not exist; {_root_hint(year)}")
    if not path.is_dir():
        raise UserError(f"--data_dir {path} is a file, not a folder; {_root_hint(year)}")
    for candidate in voc_candidates(path, year):
        if is_voc_folder(candidate):
            return candidate.resolve()
    raise UserError(wrong_root_message(path, year))


# ----------------------------------------------------------------------------------------------
# Split lists


def read_split_file(path: str | Path) -> list[str]:
    """Image ids of a split list, in file order.

    Accepts CRLF line ends, blank lines, surrounding whitespace and the devkit's per-class lists
    ("2008_000002 -1": the first token is the id). Repeated ids are dropped after their first
    occurrence, with one `warnings.warn` per file saying how many were dropped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # text mode folds CRLF; -sig drops a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read split list {path} ({exc})") from None
    tokens = [line.split()[0] for line in text.splitlines() if line.strip()]
    ids = list(dict.fromkeys(tokens))  # ordered de-duplication
    if len(ids) < len(tokens):
        warnings.warn(f"split list {path}: dropped {len(tokens) - len(ids)} repeated ids", stacklevel=2)
    return ids


def _is_per_class_list(stem: str) -> bool:
    return any(stem.startswith(name + "_") for name in VOC_CLASSES)


def _repo_split_names() -> list[str]:
    if not REPO_DATA_DIR.is_dir():
        return []
    return sorted(p.stem for p in REPO_DATA_DIR.glob("*.txt") if p.stem not in _NOT_SPLITS)


def _devkit_split_names(voc_root: Path) -> list[str]:
    main = voc_root / "ImageSets" / "Main"
    if not main.is_dir():
        return []
    return sorted(p.stem for p in main.glob("*.txt") if not _is_per_class_list(p.stem))


def _available_splits(voc_root: Path, repo_lists: bool = True) -> str:
    repo = (", ".join(_repo_split_names()) or "none") + f" (repo lists in {REPO_DATA_DIR}); " if repo_lists else ""
    devkit = ", ".join("main:" + n for n in _devkit_split_names(voc_root)) or "none"
    return (f"available: {repo}{devkit} "
            f"(devkit lists in {voc_root / 'ImageSets' / 'Main'}); or a path to a .txt list")


def _split_path(voc_root: Path, name: str, repo_lists: bool = True) -> Path:
    """Where the list named `name` lives (see resolve_split for the rule)."""
    available = _available_splits(voc_root, repo_lists)
    if name.startswith("main:"):
        path = voc_root / "ImageSets" / "Main" / f"{name[len('main:'):]}.txt"
        if not path.is_file():
            raise UserError(f"split {name!r}: {path} does not exist; {available}")
        return path
    as_path = Path(name).expanduser()
    if name.endswith(".txt") or os.sep in name:
        if as_path.is_file():
            return as_path
        raise UserError(f"split list {as_path} is not a file; {available}")
    repo_list = REPO_DATA_DIR / f"{name}.txt"
    if repo_lists and name not in _NOT_SPLITS and repo_list.is_file():
        return repo_list
    devkit_list = voc_root / "ImageSets" / "Main" / f"{name}.txt"
    if devkit_list.is_file():
        return devkit_list
    raise UserError(f"unknown split {name!r}; {available}")


def resolve_split(voc_root: Path, name: str, repo_lists: bool = True) -> tuple[list[str], Path]:
    """Ids and list file of a split.

    Rule: a path to an existing .txt file is used as is; `main:NAME` is the devkit's
    ImageSets/Main/NAME.txt; a plain NAME is the repo's data/NAME.txt when it exists and `repo_lists`
    (VOC2012: the reference protocol's train_aug, train, val, test), otherwise the devkit's
    ImageSets/Main/NAME.txt (always so for VOC2007, whose ids the repo lists do not hold).
    """
    path = _split_path(Path(voc_root), name, repo_lists)
    ids = read_split_file(path)
    if not ids:
        raise UserError(f"split {name!r} ({path}) lists no image ids")
    return ids, path


# ----------------------------------------------------------------------------------------------
# Loading a split


def _ids_without(folder: Path, ids: Sequence[str], suffix: str) -> list[str]:
    # One directory listing instead of one stat per id: VOC folders hold ~17k files.
    try:
        present = set(os.listdir(folder))
    except OSError:
        present = set()
    return [i for i in ids if i + suffix not in present]


def _listing(missing: Sequence[str]) -> str:
    more = ", ..." if len(missing) > _SHOW_IDS else ""
    return ", ".join(missing[:_SHOW_IDS]) + more


def devkit_twin_hint(voc_root: Path, name: str, source: Path) -> str:
    """A repo list shadows a same-named devkit list (the demo dataset's train/val): say how to reach it."""
    twin = voc_root / "ImageSets" / "Main" / f"{name}.txt"
    if source.parent == REPO_DATA_DIR and twin.is_file():
        return f"; this dataset has its own list {twin}: pass main:{name} to use it"
    return ""


def _check_files(voc_root: Path, name: str, ids: list[str], source: Path, require_annotations: bool) -> bool:
    """Every id needs an image; True when every id has an XML, False when none has one (if allowed)."""
    no_image = _ids_without(voc_root / "JPEGImages", ids, ".jpg")
    no_xml = _ids_without(voc_root / "Annotations", ids, ".xml")
    where = f"split {name!r} ({source})"
    hint = devkit_twin_hint(voc_root, name, source)
    if hint and len(no_image) == len(ids):
        raise UserError(f"none of the {len(ids)} ids of {where} has an image in JPEGImages/{hint}")
    # Before the image check: for VOC2012 test the real problem is the missing labels.
    if len(no_xml) == len(ids) and require_annotations:
        raise UserError(f"{where} has no annotations in Annotations/ (VOC2012 test labels are not public); "
                        f"evaluate on a labelled split such as val")
    if no_image:
        raise UserError(f"{len(no_image)} of {len(ids)} ids in {where} have no image in JPEGImages/: "
                        f"{_listing(no_image)}{hint}")
    if 0 < len(no_xml) < len(ids):
        raise UserError(f"{len(no_xml)} of {len(ids)} ids in {where} have no annotation in Annotations/: "
                        f"{_listing(no_xml)}")
    return not no_xml


def _warn_if_unlabelled(name: str, ids: list[str], annotations: list[Annotation]) -> None:
    empty = [i for i, a in zip(ids, annotations) if not a.labels.any()]
    if empty:
        warnings.warn(f"{len(empty)} images of split {name!r} have no object (all-zero labels): "
                      f"{_listing(empty)}", stacklevel=3)


def load_split(voc_root: Path, name: str, require_annotations: bool = True, repo_lists: bool = True) -> VOCSplit:
    """Ids of a split with their parsed annotations, after checking every image and XML exists.

    A split whose ids have no XML at all (VOC2012 test) is refused when annotations are required,
    else returned with `annotations=None`. Images without objects are kept (all-zero labels) with
    a warning.
    """
    voc_root = Path(voc_root)
    ids, source = resolve_split(voc_root, name, repo_lists)
    has_xml = _check_files(voc_root, name, ids, source, require_annotations)
    annotations = None
    if has_xml:
        xml_dir = voc_root / "Annotations"
        annotations = [parse_annotation(xml_dir / f"{i}.xml") for i in ids]
        _warn_if_unlabelled(name, ids, annotations)
    return VOCSplit(name=name, ids=ids, annotations=annotations, source=source)


def _require_annotations(split: VOCSplit) -> list[Annotation]:
    if split.annotations is None:
        raise UserError(f"split {split.name!r} ({split.source}) has no annotations; "
                        f"evaluate on a labelled split such as val")
    return split.annotations


def labels_matrix(split: VOCSplit) -> np.ndarray:
    """float32 (n, 20) ground truth, one row per id."""
    rows = [a.labels for a in _require_annotations(split)]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), np.float32)


def difficult_matrix(split: VOCSplit) -> np.ndarray:
    """bool (n, 20): image/class pairs whose objects are all difficult (the devkit AP ignores them)."""
    rows = [a.difficult_only for a in _require_annotations(split)]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), bool)


# ----------------------------------------------------------------------------------------------
# Dataset


class VOCClassification(MultiLabelImages):
    """(image tensor, 20 labels, index) per id of a split (see MultiLabelImages for keys and skipping).

    A split without annotations gives all-zero labels.
    """

    def __init__(self, voc_root: Path, split: VOCSplit, transform: Transform, skip_bad_images: bool = False):
        paths = [Path(voc_root) / "JPEGImages" / f"{i}.jpg" for i in split.ids]
        labels = np.zeros((len(split.ids), NUM_CLASSES), np.float32) if split.annotations is None \
            else labels_matrix(split)
        super().__init__(paths, labels, transform, skip_bad_images)
