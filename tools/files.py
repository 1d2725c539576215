"""Files on disk, one helper for each job: the atomic write, the SHA-256 of a file, the cache folder."""
from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from tools.errors import UserError

HASH_CHUNK = 1 << 20


class _HashingWriter:
    """A binary file that also hashes what is written through it."""

    def __init__(self, file: BinaryIO) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: Path, write: Callable[[BinaryIO], object], advice: str, durable: bool = True,
                 hashed: bool = False) -> str | None:
    """Write through a temp file in the same folder, then rename: a crash or a full disk never leaves a
    half-written file in place of the previous one. `write(f)` writes the bytes; `durable` syncs them to
    disk before the rename. A failed write is one UserError line, "cannot write PATH (why); {advice}".
    With `hashed`, returns the SHA-256 (hex) of the bytes, computed while writing (`f` is then a
    write-only stream: zip writers such as np.savez need the plain, seekable file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f) if hashed else f
            write(writer)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path} ({exc.strerror or exc}); {advice}") from None
        raise
    return writer.sha256.hexdigest() if hashed else None


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


def cache_folder(name: str) -> Path:
    """$OASS_CACHE/<name>, or ~/.cache/oass/<name> when OASS_CACHE is not set: the demo sets, the demo
    backbone and the parsed COCO labels."""
    cache = os.environ.get("OASS_CACHE")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "oass") / name
