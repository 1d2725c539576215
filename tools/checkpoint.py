"""Checkpoints you can trust: atomic writes that hash what they write, loading that never runs code.

A checkpoint holds only tensors and plain Python values (str, int, float, bool, None, lists, tuples,
dicts), so it loads with `torch.load(..., weights_only=True)`: a file that would need to import and
call anything (a pickle of objects, such as a shared `.pth` crafted to run code) is refused without
being unpickled. Checkpoints written before this rule (numpy RNG states inside) are converted once,
explicitly, by `python tools/convert_checkpoint.py OLD NEW`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tools.errors import UserError

CONVERT_COMMAND = "python tools/convert_checkpoint.py"
HASH_CHUNK = 1 << 20


class _HashingWriter:
    """A file wrapper that feeds every written byte to SHA-256: the hash costs no second read."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _atomic_write(path: Path, write: Any) -> str:
    """Write through a temp file in the same folder, then rename: a crash or a full disk never
    leaves a half-written file in place of the previous one. Returns the SHA-256 of the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(
                f"cannot write {path} ({exc.strerror or exc}); the previous version of it is intact — "
                "free disk space or fix the folder's permissions, then rerun with --resume"
            ) from None
        raise
    return writer.sha256.hexdigest()


def save_checkpoint(state: dict, path: Path) -> str:
    """Write `state` atomically; returns the file's SHA-256 (hex), computed while writing."""
    return _atomic_write(Path(path), lambda f: torch.save(state, f))


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=1, allow_nan=True).encode()
    _atomic_write(Path(path), lambda f: f.write(text))


def file_sha256(file: BinaryIO | Path) -> str:
    """SHA-256 (hex) of a file, read in chunks; an open file is hashed from its start and rewound."""
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            return file_sha256(f)
    file.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(HASH_CHUNK), b""):
        digest.update(chunk)
    file.seek(0)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- loading
def _refusal(path: Path, exc: pickle.UnpicklingError) -> UserError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found is None:
        return UserError(f"{path} is not a readable checkpoint (it cannot be read as plain tensors: "
                         f"{' '.join(str(exc).split())[:200]})")
    return UserError(
        f"{path} needs arbitrary code to load (it is a pickle of objects, not plain tensors: it calls "
        f"{found.group(1)}); refused, nothing in it was run. If you trust it, convert it with "
        f"{CONVERT_COMMAND} {path} NEW.pth"
    )


def load_checkpoint_and_hash(path: Path) -> tuple[Any, str]:
    """(contents, SHA-256) of a checkpoint, read with weights_only=True from one open file (so the
    hash is that of the bytes loaded, even if a trainer replaces the file meanwhile)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with open(path, "rb") as f:
            sha = file_sha256(f)
            return torch.load(f, map_location="cpu", weights_only=True), sha
    except pickle.UnpicklingError as exc:
        raise _refusal(path, exc) from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc})") from None
    except Exception as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def load_checkpoint(path: Path) -> Any:
    """A checkpoint's contents (tensors and plain values only; see load_checkpoint_and_hash)."""
    return load_checkpoint_and_hash(path)[0]


def restore_states(checkpoint: dict, path: Path, **objects: Any) -> None:
    """Restore each named object (anything with load_state_dict) from the entry of the same name."""
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in checkpoint or checkpoint[name] is None:
            raise UserError(f"{path} holds no '{name}' state; it cannot resume this run")
        try:
            obj.load_state_dict(checkpoint[name])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: its '{name}' state does not fit this run ({first[:200]})") from None


def restart_from_checkpoint(path: Path, **objects: Any) -> dict:
    """Load `path` and restore each named object from it; returns the checkpoint so that the caller
    can read the plain values it holds."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not a checkpoint of the training scripts (not a dict)")
    restore_states(checkpoint, path, **objects)
    return checkpoint


# ----------------------------------------------------------------------------- plain values
def plain_values(value: Any) -> Any:
    """`value` with numpy scalars and arrays, tuples' subclasses and paths turned into plain Python
    values and tensors, so that it loads with weights_only=True. Anything else is a programming
    error (TypeError), caught by the tests before a user ever saves it."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):  # torch's uint32 is half-supported: widen it
        return torch.from_numpy(np.array(value, dtype=np.int64 if value.dtype == np.uint32 else value.dtype))
    if isinstance(value, dict):
        plain = {plain_values(k): plain_values(v) for k, v in value.items()}
        if not isinstance(value, OrderedDict):
            return plain
        plain = OrderedDict(plain)  # a state dict: keep it one, with the version metadata of its modules
        if hasattr(value, "_metadata"):
            plain._metadata = plain_values(value._metadata)
        return plain
    if isinstance(value, tuple):
        return tuple(plain_values(v) for v in value)
    if isinstance(value, list):
        return [plain_values(v) for v in value]
    raise TypeError(f"{type(value).__module__}.{type(value).__qualname__} is not a plain value for a checkpoint")


def plain_rng_states(states: dict) -> dict:
    """RNG states as collected from random / np.random / torch (tuples and a numpy array inside) in
    the checkpoint's plain form; states already in that form are returned as they are."""
    plain = dict(states)
    python = states["python"]
    if not isinstance(python, dict):
        version, internal, gauss_next = python
        plain["python"] = {"version": int(version), "internal": [int(x) for x in internal],
                           "gauss_next": None if gauss_next is None else float(gauss_next)}
    numpy = states["numpy"]
    if not isinstance(numpy, dict):
        name, keys, pos, has_gauss, cached_gaussian = numpy
        plain["numpy"] = {"bit_generator": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return plain_values(plain)


def raw_rng_states(plain: dict) -> dict:
    """The inverse of plain_rng_states: what random.setstate / np.random.set_state / torch take."""
    python, numpy = plain["python"], plain["numpy"]
    raw = dict(plain)
    raw["python"] = (python["version"], tuple(python["internal"]), python["gauss_next"])
    raw["numpy"] = (numpy["bit_generator"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                    numpy["has_gauss"], numpy["cached_gaussian"])
    return raw
