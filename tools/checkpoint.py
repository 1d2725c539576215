"""Atomic writes of checkpoints and JSON files, and restoring a run from its last checkpoint."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tools.errors import UserError


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, then rename: a crash or a full disk never
    leaves a half-written file in place of the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def save_checkpoint(state: dict, path: Path) -> None:
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def write_json(data: Any, path: Path) -> None:
    text = json.dumps(data, indent=1, allow_nan=True).encode()
    _atomic_write(Path(path), lambda f: f.write(text))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def restart_from_checkpoint(path: Path, **objects: Any) -> dict:
    """Load `path` and restore each named object (anything with load_state_dict) from the entry of
    the same name; returns the checkpoint so that the caller can read the plain values it holds."""
    checkpoint = load_checkpoint(path)
    for name, obj in objects.items():
        if obj is None:
            continue
        if name not in checkpoint:
            raise UserError(f"{path} holds no '{name}' state; it cannot resume this run")
        obj.load_state_dict(checkpoint[name])
    return checkpoint
