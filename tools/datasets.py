"""One view of every dataset format: PASCAL VOC 2012/2007, MS-COCO 2014 and a researcher's own list files.

    kind, root = resolve_dataset(data_dir, kind=None)   # kind detected from the folder's layout if None
    split = open_dataset(kind, root, "val")             # SplitData: class names, image paths, labels, ignore
    images = dataset_images(split, transform)           # the torch Dataset for training and evaluation

Every problem a user can cause raises `UserError` with one sentence naming the file and the fix.
With `problems=[]`, `open_dataset` instead lists every broken entry there and leaves it out
(tools/check_dataset.py).
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tools import coco, label_list, voc
from tools.cam_metrics import box_array
from tools.errors import UserError
from tools.images import MultiLabelImages, Transform

DATASET_KINDS: tuple[str, ...] = ("voc2012", "voc2007", "coco2014", "list")
DEFAULT_SPLITS: dict[str, tuple[str, str]] = {  # (train, val): the field's protocol for each
    "voc2012": ("train_aug", "val"), "voc2007": ("trainval", "test"),
    "coco2014": ("train2014", "val2014"), "list": ("train", "val"),
}
_FAMILY = {"voc2012": "VOC", "voc2007": "VOC", "coco2014": "COCO", "list": "list"}
_LAYOUTS = {"VOC": "a VOC folder (JPEGImages/, Annotations/)", "COCO": "a COCO folder (annotations/, train2014/)",
            "list": f"a list folder ({label_list.CLASSES_FILE})"}
_SHOW = 5


@dataclass
class SplitData:
    """One split of a dataset: what the loaders, the metrics and the tools need, one row per image."""

    kind: str
    root: Path
    split: str
    source: Path  # the file the split was read from
    class_names: tuple[str, ...]
    names: list[str]  # per image: VOC id, COCO file name or the list's path (for messages and figures)
    image_paths: list[Path]
    labels: np.ndarray  # (n, C) float32, 1 where the image holds the class
    ignore: np.ndarray  # (n, C) bool, pairs left out of mAP_voc and the thresholded metrics (VOC difficult)
    boxes: list[np.ndarray] | None = None  # VOC: per image (M, 5) int64 class, xmin, ymin, xmax, ymax (XML: 1-based)
    notes: list[str] = field(default_factory=list)  # facts worth a log line (e.g. images left out)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----------------------------------------------------------------------------- which dataset, where
def dataset_family(kind: str) -> str:
    """VOC, COCO or list: kinds of one family share a layout (voc2012 and voc2007)."""
    return _FAMILY[kind]


def _voc_year(folder: Path) -> str:
    """2007 for a folder named VOC2007 or whose ids look like VOC2007's ('000005'), else 2012."""
    if folder.name in ("VOC2007", "VOC2012"):
        return folder.name[3:]
    for name in ("trainval", "test", "train", "val"):
        try:
            ids = voc.read_split_file(folder / "ImageSets" / "Main" / f"{name}.txt")
        except UserError:
            continue
        return "2007" if ids and re.fullmatch(r"\d{6}", ids[0]) else "2012"
    return "2012"


def _looks_like_coco(path: Path) -> bool:
    return (path / "annotations").is_dir() or (path / "train2014").is_dir() or (path / "val2014").is_dir()


def _detect(path: Path) -> tuple[str, Path] | None:
    if (path / label_list.CLASSES_FILE).is_file():
        return "list", path
    if _looks_like_coco(path):
        return "coco2014", path
    if voc.is_voc_folder(path):
        return f"voc{_voc_year(path)}", path
    for year in voc.VOC_YEARS:
        for candidate in voc.voc_candidates(path, year)[1:]:
            if voc.is_voc_folder(candidate):
                return f"voc{year}", candidate
    return None


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise UserError(f"--data_dir {path} does not exist; point it at the dataset folder")
    if not path.is_dir():
        raise UserError(f"--data_dir {path} is a file, not a folder; point it at the dataset folder")


def detect_dataset(data_dir: str | Path) -> tuple[str, Path]:
    """(kind, dataset root) from the folder's layout: classes.txt -> list; annotations/ or train2014/ ->
    coco2014; a VOC folder (or VOCdevkit/VOCyyyy, VOCyyyy under it) -> voc2012 or voc2007."""
    path = Path(data_dir).expanduser()
    _check_folder(path)
    found = _detect(path)
    if found is None:  # the VOC message says what is wrong with a VOC folder, the usual case
        raise UserError(f"{voc.wrong_root_message(path, '2012')} (nor is it a COCO folder with annotations/ or a "
                        f"list folder with {label_list.CLASSES_FILE}; see --dataset)")
    return found[0], found[1].resolve()


def resolve_dataset(data_dir: str | Path, kind: str | None = None) -> tuple[str, Path]:
    """(kind, root): `kind` checked against the folder's layout, or detected from it when None."""
    if kind is None:
        return detect_dataset(data_dir)
    if kind not in DATASET_KINDS:
        raise UserError(f"--dataset {kind}: unknown; choose one of {', '.join(DATASET_KINDS)}")
    path = Path(data_dir).expanduser()
    _check_folder(path)
    found = _detect(path)
    if found is not None and _FAMILY[found[0]] != _FAMILY[kind]:
        raise UserError(f"--dataset {kind} does not match --data_dir {path}, which is {_LAYOUTS[_FAMILY[found[0]]]}; "
                        f"pass --dataset {found[0]} (or drop --dataset) or point --data_dir at a {kind} folder")
    if kind.startswith("voc"):
        return kind, voc.resolve_voc_root(path, kind[3:])
    if found is None:
        expected = ("annotations/instances_{train,val}2014.json and the train2014/, val2014/ image folders"
                    if kind == "coco2014" else f"{label_list.CLASSES_FILE} and one .csv file per split")
        raise UserError(f"--data_dir {path} is not a {kind} folder: it has no "
                        f"{'annotations/' if kind == 'coco2014' else label_list.CLASSES_FILE} "
                        f"({voc.list_entries(path)}); a {kind} folder holds {expected}")
    return kind, path.resolve()


def default_splits(kind: str) -> tuple[str, str]:
    return DEFAULT_SPLITS[kind]


# ----------------------------------------------------------------------------- reading a split
def open_dataset(kind: str, root: str | Path, split: str, require_annotations: bool = True,
                 keep_unlabelled: bool = False, problems: list[str] | None = None) -> SplitData:
    """A split of the dataset at `root` (a folder that resolve_dataset returned).

    COCO images without any annotation are left out unless `keep_unlabelled` (the usual protocol);
    VOC and list images without labels are kept with all-zero labels and a warning. With `problems`
    (a list), broken entries are listed there and left out instead of raising.
    """
    root = Path(root)
    if kind.startswith("voc"):
        data = _open_voc(kind, root, split, require_annotations, problems)
    elif kind == "coco2014":
        data = _open_coco(root, split, keep_unlabelled, problems)
    elif kind == "list":
        data = _open_list(root, split, problems)
    else:
        raise UserError(f"--dataset {kind}: unknown; choose one of {', '.join(DATASET_KINDS)}")
    if not data.names and problems is None:
        raise UserError(f"split {split!r} of {root} ({data.source}) has no images; choose another split "
                        f"or fill it")
    return data


def _checked_voc_annotations(root: Path, split: str, repo_lists: bool,
                             problems: list[str]) -> tuple[list[str], list[voc.Annotation], Path]:
    """Check mode: every missing image or XML and every broken XML becomes one problem line."""
    ids, source = voc.resolve_split(root, split, repo_lists)
    images = set(os.listdir(root / "JPEGImages"))
    if not any(f"{i}.jpg" in images for i in ids):  # a wrong split, not thousands of missing files
        raise UserError(f"none of the {len(ids)} ids of split {split!r} ({source}) has an image in JPEGImages/; "
                        f"{voc.devkit_twin_hint(root, split, source).removeprefix('; ') or 'check the split'}")
    kept, annotations = [], []
    for image_id in ids:
        if f"{image_id}.jpg" not in images:
            problems.append(f"JPEGImages/{image_id}.jpg: missing (listed in {source.name})")
            continue
        try:
            annotations.append(voc.parse_annotation(root / "Annotations" / f"{image_id}.xml"))
        except UserError as exc:
            problems.append(str(exc))
            continue
        kept.append(image_id)
    return kept, annotations, source


def _open_voc(kind: str, root: Path, split: str, require_annotations: bool,
              problems: list[str] | None) -> SplitData:
    repo_lists = kind == "voc2012"  # data/*.txt hold VOC2012 ids
    if problems is None:
        loaded = voc.load_split(root, split, require_annotations, repo_lists)
        ids, annotations, source = loaded.ids, loaded.annotations, loaded.source
    else:
        ids, annotations, source = _checked_voc_annotations(root, split, repo_lists, problems)
    count = voc.NUM_CLASSES
    labels = np.stack([a.labels for a in annotations]) if annotations else np.zeros((len(ids), count), np.float32)
    ignore = np.stack([a.difficult_only for a in annotations]) if annotations else np.zeros((len(ids), count), bool)
    boxes = [box_array(a.objects) for a in annotations] if annotations else None
    return SplitData(kind, root, split, source, voc.VOC_CLASSES, list(ids),
                     [root / "JPEGImages" / f"{i}.jpg" for i in ids], labels, ignore, boxes)


def _coco_missing_images(folder: Path, file_names: list[str]) -> list[int]:
    try:
        present = set(os.listdir(folder))  # one listing, not 80k stats
    except OSError:
        present = set()
    return [i for i, name in enumerate(file_names) if name not in present]


def _open_coco(root: Path, split: str, keep_unlabelled: bool, problems: list[str] | None) -> SplitData:
    json_path = coco.instances_path(root, split)
    if not json_path.is_file():
        splits = sorted(p.stem.removeprefix("instances_") for p in (root / "annotations").glob("instances_*.json"))
        raise UserError(f"{json_path} does not exist (split {split!r}; available: {', '.join(splits) or 'none'}); "
                        f"{coco.DOWNLOAD_HINT}")
    parsed = coco.load_instances(json_path)
    labelled = parsed.labels.any(axis=1)
    rows = np.arange(len(parsed.image_ids)) if keep_unlabelled else np.flatnonzero(labelled)
    notes = [f"{split}: {int(labelled.sum()):,} of {len(labelled):,} images have annotations; the "
             f"{int((~labelled).sum()):,} without any are {'kept' if keep_unlabelled else 'left out'}"]
    file_names = [parsed.file_names[i] for i in rows]
    missing = _coco_missing_images(root / split, file_names)
    if missing and problems is None:
        shown = ", ".join(file_names[i] for i in missing[:_SHOW]) + (", ..." if len(missing) > _SHOW else "")
        raise UserError(f"{len(missing)} of {len(file_names)} images of {json_path.name} are missing from "
                        f"{root / split}/: {shown}; download and extract {split}.zip")
    if problems is not None and missing:
        problems.extend(f"{split}/{file_names[i]}: missing (listed in {json_path.name})" for i in missing)
        gone = set(missing)
        rows = np.asarray([r for i, r in enumerate(rows) if i not in gone], np.int64)
        file_names = [parsed.file_names[i] for i in rows]
    labels = parsed.labels[rows].astype(np.float32)
    return SplitData("coco2014", root, split, json_path, parsed.class_names, file_names,
                     [root / split / name for name in file_names], labels, np.zeros(labels.shape, bool), notes=notes)


def _open_list(root: Path, split: str, problems: list[str] | None) -> SplitData:
    class_names = label_list.read_class_names(root)
    parsed = label_list.read_list_split(root, split, class_names, problems)
    labels = parsed.labels
    empty = [p for p, row in zip(parsed.paths, labels) if not row.any()]
    if empty and problems is None:
        warnings.warn(f"{len(empty)} images of split {split!r} have no labels (all-zero): "
                      f"{', '.join(empty[:_SHOW])}{', ...' if len(empty) > _SHOW else ''}", stacklevel=3)
    return SplitData("list", root, split, parsed.source, class_names, list(parsed.paths),
                     [root / p for p in parsed.paths], labels, np.zeros(labels.shape, bool))


def dataset_images(split: SplitData, transform: Transform, skip_bad_images: bool = False) -> MultiLabelImages:
    """The torch Dataset of a split: (image tensor, labels (C,), index) with `transform`."""
    return MultiLabelImages(split.image_paths, split.labels, transform, skip_bad_images)
