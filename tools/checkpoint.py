"""Checkpoints you can trust: atomic writes that hash what they write, loading that never runs code.

A checkpoint holds only tensors and plain Python values (str, int, float, bool, None, lists, tuples,
dicts), so it loads with `torch.load(..., weights_only=True)`: a file that would need to import and
call anything (a pickle of objects, such as a shared `.pth` crafted to run code) is refused without
being unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.errors import UserError
from tools.files import atomic_write, file_sha256

WRITE_ADVICE = ("the previous version of it is intact — free disk space or fix the folder's permissions, then "
                "rerun with --resume")


def save_checkpoint(state: dict, path: Path) -> str:
    """Write `state` atomically; returns the file's SHA-256 (hex), computed while writing."""
    return atomic_write(Path(path), lambda f: torch.save(state, f), WRITE_ADVICE, hashed=True)


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=1, allow_nan=True).encode()
    atomic_write(Path(path), lambda f: f.write(text), WRITE_ADVICE)


# ----------------------------------------------------------------------------- loading
def _refusal(path: Path, exc: pickle.UnpicklingError) -> UserError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found is None:
        return UserError(f"{path} is not a readable checkpoint (it cannot be read as plain tensors: "
                         f"{' '.join(str(exc).split())[:200]})")
    return UserError(
        f"{path} needs arbitrary code to load (it is a pickle of objects, not plain tensors: it calls "
        f"{found.group(1)}); refused, nothing in it was run. The training scripts write tensors and plain "
        "values only: use a checkpoint they wrote"
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
