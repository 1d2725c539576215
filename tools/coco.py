"""MS-COCO (2014) for multi-label classification: image labels from the instances JSON, with a label cache.

Layout: ROOT/annotations/instances_{split}.json and ROOT/{split}/<file_name> (train2014, val2014).
An image's labels are the categories of its annotations (crowd ones included, as ML-GCN does); the
categories map to 0..C-1 in the order of their ids. The train JSON is about 450 MB, so the parsed
labels are cached once as a small .npz in a cache folder, keyed by the JSON's path, size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tools.errors import UserError, user_message
from tools.files import atomic_write, cache_folder

CACHE_VERSION = 1
DOWNLOAD_HINT = "download annotations_trainval2014.zip from cocodataset.org and extract it into the data folder"


@dataclass
class CocoLabels:
    """Every image of one instances file, in image-id order."""

    class_names: tuple[str, ...]
    category_ids: np.ndarray  # (C,) int64, ascending
    image_ids: np.ndarray  # (n,) int64, ascending
    file_names: list[str]
    labels: np.ndarray  # (n, C) bool
    num_annotations: int


def instances_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def default_cache_dir() -> Path:
    """$OASS_CACHE/coco_labels when OASS_CACHE is set, else ~/.cache/oass/coco_labels."""
    return cache_folder("coco_labels")


# ----------------------------------------------------------------------------- parsing the JSON
def _where(path: Path) -> str:
    return f"annotations/{path.name}"


def _read_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; {DOWNLOAD_HINT}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{_where(path)} is not valid JSON ({exc}); re-download it: {DOWNLOAD_HINT}") from None
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"{_where(path)} is not a COCO instances file (no {missing[0]!r} list; captions or "
                        f"keypoints files do not fit); use annotations/instances_<split>.json: {DOWNLOAD_HINT}")
    return data


def _field_array(items: list, key: str, what: str, where: str) -> np.ndarray:
    try:
        return np.fromiter((int(item[key]) for item in items), dtype=np.int64, count=len(items))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{where} is not a COCO instances file (an entry of {what!r} has no integer "
                        f"{key!r}); {DOWNLOAD_HINT}") from None


def _index_of(values: np.ndarray, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `values` in `sorted_keys` and a mask of the values found there."""
    if len(sorted_keys) == 0:
        return np.zeros(len(values), np.int64), np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return pos, sorted_keys[pos] == values


def _categories(data: dict, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    categories = data["categories"]
    ids = _field_array(categories, "id", "categories", where)
    if len(ids) == 0:
        raise UserError(f"{where} lists no categories; {DOWNLOAD_HINT}")
    if len(np.unique(ids)) < len(ids):
        raise UserError(f"{where}: category ids repeat; re-download it: {DOWNLOAD_HINT}")
    order = np.argsort(ids, kind="stable")
    names = tuple(str(categories[i].get("name", categories[i]["id"])) for i in order)
    return ids[order], names


def parse_instances(path: Path) -> CocoLabels:
    """Read an instances JSON (slow for train2014: seconds and a few GB) into per-image labels."""
    path = Path(path)
    where = _where(path)
    data = _read_json(path)
    category_ids, names = _categories(data, where)
    images, annotations = data["images"], data["annotations"]
    image_ids = _field_array(images, "id", "images", where)
    order = np.argsort(image_ids, kind="stable")
    image_ids = image_ids[order]
    try:
        file_names = [str(images[i]["file_name"]) for i in order]
    except KeyError:
        raise UserError(f"{where} is not a COCO instances file (an image has no 'file_name'); "
                        f"{DOWNLOAD_HINT}") from None
    ann_images = _field_array(annotations, "image_id", "annotations", where)
    ann_classes = _field_array(annotations, "category_id", "annotations", where)
    cols, known = _index_of(ann_classes, category_ids)
    if not known.all():
        bad = int(np.flatnonzero(~known)[0])
        raise UserError(f"{where}: annotation {annotations[bad].get('id', bad)} has category_id "
                        f"{int(ann_classes[bad])}, which is not among the file's {len(category_ids)} categories "
                        f"(ids {int(category_ids[0])}..{int(category_ids[-1])}); fix or re-download the file")
    rows, listed = _index_of(ann_images, image_ids)
    if not listed.all():
        bad = int(np.flatnonzero(~listed)[0])
        raise UserError(f"{where}: annotation {annotations[bad].get('id', bad)} refers to image_id "
                        f"{int(ann_images[bad])}, which the file's images do not list; fix or re-download it")
    labels = np.zeros((len(image_ids), len(category_ids)), dtype=bool)
    labels[rows, cols] = True
    return CocoLabels(names, category_ids, image_ids, file_names, labels, len(annotations))


# ----------------------------------------------------------------------------- the label cache
def _cache_file(path: Path, cache_dir: Path) -> tuple[Path, str]:
    """(cache file, prefix shared by every cache of this JSON path) for the JSON's current size and mtime."""
    stat = path.stat()
    source = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    version = hashlib.sha1(f"{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:12]
    prefix = f"{path.stem}-{source}-"
    return cache_dir / f"{prefix}{version}.npz", prefix


def _read_cache(file: Path) -> CocoLabels | None:
    try:
        with np.load(file, allow_pickle=False) as z:
            num_classes = len(z["category_ids"])
            return CocoLabels(tuple(z["class_names"].tolist()), z["category_ids"], z["image_ids"],
                              z["file_names"].tolist(), np.unpackbits(z["labels"], axis=1, count=num_classes)
                              .astype(bool), int(z["num_annotations"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged: parse the JSON again


def _write_cache(file: Path, prefix: str, coco: CocoLabels) -> None:
    arrays = {"class_names": np.array(coco.class_names), "category_ids": coco.category_ids,
              "image_ids": coco.image_ids, "file_names": np.array(coco.file_names, dtype=str),
              "labels": np.packbits(coco.labels, axis=1), "num_annotations": np.int64(coco.num_annotations)}
    try:
        atomic_write(file, lambda f: np.savez(f, **arrays), "the JSON will be parsed again next time (set "
                     "OASS_CACHE to a writable folder)", durable=False)
        for stale in file.parent.glob(f"{prefix}*.npz"):  # caches of older versions of the same JSON
            if stale != file:
                stale.unlink(missing_ok=True)
    except (OSError, UserError) as exc:  # a cache only: the labels are parsed, so warn and go on
        reason = user_message(exc) if isinstance(exc, UserError) else f"cannot write {file} ({exc.strerror or exc})"
        warnings.warn(f"COCO label cache: {reason}", stacklevel=3)


def load_instances(path: Path, cache_dir: Path | None = None) -> CocoLabels:
    """`parse_instances` through the cache: parsed once per (path, size, mtime), then read in well under a second."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; {DOWNLOAD_HINT}")
    file, prefix = _cache_file(path, cache_dir or default_cache_dir())
    cached = _read_cache(file)
    if cached is not None:
        return cached
    coco = parse_instances(path)
    _write_cache(file, prefix, coco)
    return coco
