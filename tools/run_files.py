"""Where a run's outputs live, and the text log and JSON history written there (one set per --tag)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from tools.errors import UserError


@dataclass
class RunFiles:
    """<root>/logs/<tag>.txt, <root>/data/<tag>.json and <root>/models/<tag>_{best,last}.pth."""

    root: Path
    tag: str

    @property
    def log(self) -> Path:
        return self.root / "logs" / f"{self.tag}.txt"

    @property
    def history(self) -> Path:
        return self.root / "data" / f"{self.tag}.json"

    def checkpoint(self, which: str) -> Path:
        return self.root / "models" / f"{self.tag}_{which}.pth"

    def existing(self) -> list[Path]:
        return [p for p in (self.log, self.history, self.checkpoint("last"), self.checkpoint("best")) if p.exists()]

    def prepare(self, resume: bool, overwrite: bool) -> None:
        """Refuse to clobber a run silently, and fail early on an unwritable folder."""
        found = self.existing()
        if found and not (resume or overwrite):
            raise UserError(
                f"--tag {self.tag} already has outputs ({found[0]}); pass --resume to continue that run "
                "or --overwrite to start it over, or choose another --tag"
            )
        if resume and not self.checkpoint("last").exists():
            raise UserError(f"--resume: no checkpoint {self.checkpoint('last')} to resume from; drop --resume")
        for folder in (self.log.parent, self.history.parent, self.checkpoint("last").parent):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".write_test_{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise UserError(f"cannot write to {folder} ({exc.strerror}); use --output_dir DIR") from None
        if overwrite:
            for path in found:
                path.unlink()


class Logger:
    """Text log per tag (rank 0 only): the config first, then progress lines."""

    def __init__(self, path: Path, enabled: bool, append: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and not append:
            path.write_text("")

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        tqdm.write(line)
        with open(self.path, "a") as f:
            f.write(line + "\n")


@dataclass
class History:
    """The JSON history: the config, one row per log line, one record per validation, and extras."""

    config: dict
    train: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"config": self.config, "train": self.train, "validation": self.validation, **self.extra}

    @classmethod
    def from_dict(cls, saved: dict, config: dict) -> History:
        """Continue a saved history under the current config (the keys beyond the three lists are extras)."""
        extra = {k: v for k, v in saved.items() if k not in ("config", "train", "validation")}
        return cls(config=config, train=saved["train"], validation=saved["validation"], extra=extra)
