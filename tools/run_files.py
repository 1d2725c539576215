"""Where a run's outputs live (checkpoints by --tag, CAM folders), and the text log and JSON history
written there (one set per --tag)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.checkpoint import WRITE_ADVICE
from tools.errors import UserError
from tools.files import atomic_write


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

    @property
    def val_scores(self) -> Path:
        """The best validation's per-image scores (save_val_scores)."""
        return self.root / "data" / f"{self.tag}_val_scores.npz"

    def existing(self) -> list[Path]:
        paths = (self.log, self.history, self.checkpoint("last"), self.checkpoint("best"), self.val_scores)
        return [p for p in paths if p.exists()]

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


CHECKPOINT_NAMES = ("best", "last")


def safe_name(text: str) -> str:
    """A split name or label as a file-name part: 'main:val' -> 'main_val', a list path -> its stem."""
    if text.endswith(".txt") or "/" in text or "\\" in text:
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("_") or "split"


def cam_folder(output_dir: str | Path, tag: str, split: str, teacher: bool = False) -> Path:
    """Where make_cams.py writes (and evaluate_cams.py reads) a run's CAMs of a split by default."""
    return Path(output_dir) / "cams" / f"{tag}_{safe_name(split)}{'_teacher' if teacher else ''}"


def known_tags(output_dir: str | Path) -> list[str]:
    """Tags that have at least one checkpoint under output_dir/models."""
    folder = Path(output_dir) / "models"
    if not folder.is_dir():
        return []
    tags = {p.name[: -len(f"_{which}.pth")] for which in CHECKPOINT_NAMES for p in folder.glob(f"*_{which}.pth")}
    return sorted(tags)


def _tags_hint(output_dir: str | Path) -> str:
    tags = known_tags(output_dir)
    if not tags:
        return f"no run has checkpoints under {Path(output_dir) / 'models'}"
    shown = ", ".join(tags[:8]) + (", ..." if len(tags) > 8 else "")
    return f"tags with checkpoints there: {shown}"


def resolve_checkpoint(tag: str | None, checkpoint: str | None, output_dir: str | Path) -> Path:
    """The .pth file meant by --tag / --checkpoint best|last|PATH, or a UserError naming what was tried."""
    which = checkpoint or "best"
    if which not in CHECKPOINT_NAMES:
        path = Path(which).expanduser()
        if not path.is_file():
            raise UserError(f"--checkpoint {which}: no such file; pass best, last or the path of a .pth file")
        return path
    if tag is None:
        raise UserError(f"--checkpoint {which} needs --tag (or pass --checkpoint PATH to a .pth file)")
    files = RunFiles(Path(output_dir), tag)
    path = files.checkpoint(which)
    if path.is_file():
        return path
    others = [p for p in (files.checkpoint(n) for n in CHECKPOINT_NAMES) if p.is_file()]
    if others:
        other = others[0].stem.rsplit("_", 1)[-1]
        raise UserError(f"--tag {tag} has no {which} checkpoint ({path}); pass --checkpoint {other} "
                        f"({others[0]}) or wait for the run to write it")
    tried = " or ".join(str(files.checkpoint(n)) for n in CHECKPOINT_NAMES)
    raise UserError(f"unknown --tag {tag}: no checkpoint {tried}; {_tags_hint(output_dir)} — check the tag, "
                    "pass --output_dir DIR where the run wrote its models/, or --checkpoint PATH")

def save_val_scores(path: Path, image_ids: list[str], scores: np.ndarray, labels: np.ndarray, ignore: np.ndarray,
                    **facts: float) -> None:
    """The per-image evidence behind a validation's mAP, for paired comparisons between runs: image ids,
    scores (N, C) as the model gave them, labels (N, C) and mAP_voc's ignore mask (N, C); `facts` (the
    iteration, the logged mAPs) are stored beside them. Written atomically."""
    arrays = {"image_ids": np.asarray(image_ids, dtype=str), "scores": np.asarray(scores, np.float32),
              "labels": np.asarray(labels, np.uint8), "ignore": np.asarray(ignore, bool),
              **{k: np.asarray(v) for k, v in facts.items()}}
    atomic_write(path, lambda f: np.savez(f, **arrays), WRITE_ADVICE)


def describe_config(config: dict, extra: dict) -> str:
    lines = ["# config"] + [f"{k}: {v}" for k, v in sorted(config.items())]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


# how the log line shows a statistic that is not a loss (others: its name and 4 digits)
LOG_FORMATS = {"tasks_per_batch": "tasks/batch {:.1f}", "keypoint_distance": "kp_dist {:.1f}px"}


def log_field(name: str, value: float) -> str:
    return LOG_FORMATS.get(name, name + " {:.4g}").format(value)


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

    def add_environment(self, now: dict) -> None:
        """Record where this session runs; a resume elsewhere (another machine, library, thread count) adds one."""
        sessions = self.extra.setdefault("environment", [])
        if not sessions or sessions[-1] != now:
            sessions.append(now)

    @classmethod
    def from_dict(cls, saved: dict, config: dict) -> History:
        """Continue a saved history under the current config (the keys beyond the three lists are extras)."""
        extra = {k: v for k, v in saved.items() if k not in ("config", "train", "validation")}
        return cls(config=config, train=saved["train"], validation=saved["validation"], extra=extra)
