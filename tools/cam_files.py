"""The CAM folder of make_cams.py: one compressed .npz per image and a metadata file saying where they came from.

    <folder>/<image id>.npz   classes: int64 (K,) 0-based VOC class indices of the image's positive classes
                              cams:    float32 (K, H, W) their CAMs at the image's size, in [0, 1)
    <folder>/cams.json        the checkpoint (path and SHA-256 of the file), network, split (name and a
                              digest of its ids), scales, data folder

evaluate_cams.py refuses a folder whose metadata names another checkpoint file (by content) or split.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from tools.errors import UserError
from tools.files import atomic_write

METADATA_NAME = "cams.json"
FORMAT_VERSION = 1
# what must agree between a folder and the run/split it is used for (scales may differ: they are reported)
PROVENANCE_KEYS = ("checkpoint_sha256", "network", "split", "split_ids_sha256")


def ids_sha256(ids: list[str]) -> str:
    """Digest of a split's id list (order included): the same name may list other images elsewhere."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def cam_file(folder: Path, image_id: str) -> Path:
    return Path(folder) / f"{image_id.replace('/', '_').replace(os.sep, '_')}.npz"


CAM_WRITE_ADVICE = "free disk space or choose another --out, then rerun with --resume"


def save_cams(path: Path, classes: np.ndarray, cams: np.ndarray) -> None:
    atomic_write(Path(path), lambda f: np.savez_compressed(
        f, classes=np.asarray(classes, np.int64), cams=np.asarray(cams, np.float32)), CAM_WRITE_ADVICE, durable=False)


def load_cams(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(classes (K,), cams (K, H, W)) of one image; a damaged file is a one-line UserError."""
    try:
        with np.load(path) as data:
            classes, cams = data["classes"].astype(np.int64), data["cams"].astype(np.float32)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path} is not a readable CAM file ({type(exc).__name__}); delete it and rerun "
                        "make_cams.py with --resume") from None
    if cams.ndim != 3 or cams.shape[0] != classes.shape[0]:
        raise UserError(f"{path}: cams {cams.shape} do not match classes {classes.shape}; delete it and rerun "
                        "make_cams.py with --resume")
    return classes, cams


def write_metadata(folder: Path, metadata: dict) -> None:
    text = (json.dumps({"format": FORMAT_VERSION, **metadata}, indent=1) + "\n").encode()
    atomic_write(Path(folder) / METADATA_NAME, lambda f: f.write(text), CAM_WRITE_ADVICE, durable=False)


def read_metadata(folder: Path) -> dict | None:
    """The folder's metadata, None when it has none; unreadable metadata is a UserError."""
    path = Path(folder) / METADATA_NAME
    if not path.exists():
        return None
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({type(exc).__name__}); rerun make_cams.py with --overwrite") \
            from None
    if not isinstance(metadata, dict):
        raise UserError(f"{path} is not CAM metadata; rerun make_cams.py with --overwrite")
    return metadata


def provenance_mismatch(recorded: dict, expected: dict) -> str | None:
    """A sentence naming the first provenance field that differs (None when the folder fits)."""
    labels = {"checkpoint_sha256": "checkpoint", "network": "network", "split": "split",
              "split_ids_sha256": "split's image list"}
    for key in PROVENANCE_KEYS:
        if recorded.get(key) != expected.get(key):
            if key == "checkpoint_sha256":
                return (f"they were made from checkpoint {recorded.get('checkpoint')} (SHA-256 "
                        f"{str(recorded.get(key))[:12]}...), not from {expected.get('checkpoint')} "
                        f"(SHA-256 {str(expected.get(key))[:12]}...)")
            if key == "split_ids_sha256":
                return (f"they were made for another image list under the split name {recorded.get('split')!r} "
                        f"({recorded.get('num_images')} images, data {recorded.get('data_root')})")
            return f"they were made for {labels[key]} {recorded.get(key)!r}, not {expected.get(key)!r}"
    return None
