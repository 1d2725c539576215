"""Shared pieces of the research tools (evaluate_classification.py, visualize_cams.py, infer.py).

Finding and loading a run's checkpoint by tag, rebuilding its network, locating its data, preparing
images the way evaluation does, and drawing CAM overlays. Every problem a user can cause raises
`UserError`, which the scripts turn into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from core.builder import Classifier, classifier_from_config, make_cams
from core.keypoints import upsample_maps
from core.recipe import RUN_DEFINING_FLAGS, flag_defaults
from tools.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, long_side_size
from tools.checkpoint import load_checkpoint_and_hash
from tools.datasets import SplitData, dataset_family, default_splits, detect_dataset, open_dataset, resolve_dataset
from tools.demo_formats import default_demo_root, generate_demo, is_outdated_demo
from tools.errors import UserError
from tools.images import BadImageError, load_rgb_image
from tools.run_files import RunFiles
from tools.voc import VOC_CLASSES

CHECKPOINT_NAMES = ("best", "last")
OVERLAY_ALPHA = 0.5  # weight of the heat map in a CAM overlay


# ----------------------------------------------------------------------------- command line
def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--tag / --checkpoint / --output_dir / --device, shared by the tools that load a run."""
    parser.add_argument("--tag", default=None, help="the run's --tag (optional with --checkpoint PATH: then the "
                        "checkpoint's own tag names the outputs)")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last (the tag's checkpoints under OUTPUT_DIR/models) or a path to a .pth")
    parser.add_argument("--output_dir", default="experiments", help="the runs' output folder (models/, data/, ...)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def safe_name(text: str) -> str:
    """A split name or label as a file-name part: 'main:val' -> 'main_val', a list path -> its stem."""
    if text.endswith(".txt") or "/" in text or "\\" in text:
        text = Path(text).stem
    return re.sub(r"[^A-Za-z0-9._@-]+", "_", text).strip("_") or "split"


def cam_folder(output_dir: str | Path, tag: str, split: str, teacher: bool = False) -> Path:
    """Where make_cams.py writes (and evaluate_cams.py reads) a run's CAMs of a split by default."""
    return Path(output_dir) / "cams" / f"{tag}_{safe_name(split)}{'_teacher' if teacher else ''}"


# ----------------------------------------------------------------------------- checkpoints
def run_files(output_dir: str | Path, tag: str):
    """The trainer's RunFiles layout (models/<tag>_{best,last}.pth, data/<tag>.json, ...)."""
    return RunFiles(Path(output_dir), tag)


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
    files = run_files(output_dir, tag)
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


def read_checkpoint(path: Path) -> tuple[dict, str]:
    """(checkpoint, its SHA-256) of this repo's trainer (a dict with 'model' and 'config'), loaded on
    the CPU with weights_only=True: a file that would run code is refused, never unpickled."""
    checkpoint, sha = load_checkpoint_and_hash(path)
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of the training scripts (no 'model'/'config' entries)")
    return checkpoint, sha


def run_class_names(config: dict) -> tuple[str, ...]:
    """The classes a run was trained on (runs from before the dataset choice were VOC's 20)."""
    return tuple(config.get("class_names") or VOC_CLASSES)


def build_classifier(config: dict, state: dict, device: torch.device) -> Classifier:
    """The run's network rebuilt from its config (no ImageNet download) with `state` loaded, in eval mode."""
    # a flag the config does not record counts as its default, the parser's (as --resume counts it)
    recorded = {**flag_defaults(bool(config.get("demo"))), **config}
    model = classifier_from_config(recorded, num_classes=len(run_class_names(config)))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"the checkpoint's weights do not fit a {config.get('architecture')} Classifier "
                        f"({first})") from None
    return model.to(device).eval()


@dataclass
class LoadedRun:
    path: Path  # the checkpoint file
    tag: str
    config: dict  # the run's argparse flags
    model: Classifier  # in eval mode, on the chosen device
    network: str  # "student" or "teacher"
    epoch: float
    iteration: int
    sha256: str = ""  # of the checkpoint file's bytes: which file produced a reported number
    script: str | None = None  # the training script that wrote it

    def provenance(self) -> dict:
        """What outputs store about the checkpoint behind them (see README: provenance)."""
        return {"checkpoint": str(self.path), "checkpoint_sha256": self.sha256, "script": self.script,
                "network": self.network, "iteration": self.iteration, "config": self.config}


def describe_provenance(run: LoadedRun) -> list[str]:
    """Two '# ' lines for the tools' output: the checkpoint and its hash, and the recipe it was trained
    with (the run-defining flags; outputs store the whole config)."""
    flags = " ".join(f"{name}={run.config[name]}" for name in RUN_DEFINING_FLAGS if name in run.config)
    return [f"# checkpoint {run.path} sha256 {run.sha256} ({run.network}, iteration {run.iteration})",
            f"# trained with: {run.script or 'unknown script'} {flags}"]


def load_run(tag: str | None, checkpoint: str | None, output_dir: str | Path, device: torch.device,
             teacher: bool = False) -> LoadedRun:
    """Checkpoint of --tag/--checkpoint, its network (the EMA teacher with teacher=True) ready to evaluate."""
    path = resolve_checkpoint(tag, checkpoint, output_dir)
    ckpt, sha = read_checkpoint(path)
    config = dict(ckpt["config"])
    if teacher and ckpt.get("teacher") is None:
        raise UserError(f"{path} holds no EMA teacher (strategy {config.get('strategy')}, patch network "
                        f"{config.get('patch_network')}); drop --teacher")
    state = ckpt["teacher"] if teacher else ckpt["model"]
    model = build_classifier(config, state, device)
    return LoadedRun(path=path, tag=tag or config.get("tag") or path.stem, config=config, model=model,
                     network="teacher" if teacher else "student", epoch=float(ckpt.get("epoch", 0.0)),
                     iteration=int(ckpt.get("iteration", 0)), sha256=sha,
                     script=ckpt.get("script") or (ckpt.get("history") or {}).get("script"))


# ----------------------------------------------------------------------------- data
def run_dataset(config: dict, data_dir: str | None) -> tuple[str, Path]:
    """(kind, folder) to read: --data_dir when given (its layout decides), else the run's own dataset (the demo
    cache for --demo runs, rebuilt if deleted)."""
    kind = config.get("dataset")
    if data_dir is not None:  # the run's kind where the layout allows it (a VOC2007 run reads VOC2007 splits)
        detected = detect_dataset(data_dir)
        same_family = kind is not None and dataset_family(kind) == dataset_family(detected[0])
        return resolve_dataset(data_dir, kind) if same_family else detected
    if config.get("demo"):
        demo = "voc" if config["demo"] is True else config["demo"]  # runs from before --demo took a format
        root = Path(config["data_dir"]) if config.get("data_dir") else default_demo_root(demo)
        if not is_outdated_demo(root, demo):
            try:
                return resolve_dataset(root, kind)
            except UserError:
                pass
        # the same call the trainer makes: rebuilds a deleted cache, or one from an older generator
        return resolve_dataset(generate_demo(demo, root), kind)
    if not config.get("data_dir"):
        raise UserError("the run's config names no data_dir; pass --data_dir DIR")
    try:
        return resolve_dataset(config["data_dir"], kind)
    except UserError as exc:
        raise UserError(f"the run's data folder is not usable ({exc}); pass --data_dir DIR") from None


def data_root(config: dict, data_dir: str | None) -> Path:
    """The dataset folder to read (see run_dataset)."""
    return run_dataset(config, data_dir)[1]


def default_split(config: dict) -> str:
    """The split the run validated on (main:val for VOC --demo runs)."""
    return config.get("val_split") or default_splits(config.get("dataset") or "voc2012")[1]


def open_run_split(config: dict, data_dir: str | None, split: str | None,
                   require_annotations: bool = True) -> SplitData:
    """A split of the run's dataset (or of --data_dir's), checked to hold the classes the run was trained on."""
    kind, root = run_dataset(config, data_dir)
    data = open_dataset(kind, root, split or default_split(config), require_annotations,
                        keep_unlabelled=config.get("keep_unlabelled", False))
    trained = run_class_names(config)
    if data.class_names != trained:
        raise UserError(f"the run was trained on {len(trained)} classes ({', '.join(trained[:4])}, ...), but split "
                        f"{data.split!r} of {root} ({kind}) has {data.num_classes} ({', '.join(data.class_names[:4])}, "
                        f"...); pass the --data_dir of the run's dataset")
    return data


# ----------------------------------------------------------------------------- images
def open_image(path: str | Path) -> Image.Image:
    """An RGB image from a user-given path; a missing or undecodable file is a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        return load_rgb_image(path)
    except BadImageError:
        raise UserError(f"{path} is not a readable image (truncated, or not an image file)") from None


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the long side is `size` (bicubic, the training resize), aspect kept."""
    return image.resize(long_side_size(image.width, image.height, size), Image.BICUBIC)


def eval_input(image: Image.Image, image_size: int, fit: bool = False) -> torch.Tensor:
    """(3, S, S) network input: normalise, top-left window of S x S zero-padded (EvalTransform).

    fit=True first resizes the long side to S, so that an arbitrary photo is seen whole.
    """
    return EvalTransform(image_size, fit_long_side=fit)(image)


def denormalize(images: torch.Tensor) -> np.ndarray:
    """Normalised (3, H, W) or (B, 3, H, W) tensors -> uint8 RGB (H, W, 3) or (B, H, W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (images.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).movedim(-3, -1).numpy()


@torch.no_grad()
def predict_with_cams(model: Classifier, image: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(logits (C,), CAMs (C, h, w) at the feature resolution, CAMs (C, S, S) upsampled) of one (3, S, S) input."""
    logits, features = model(image[None].to(device))
    cams = make_cams(features.float())[0].cpu()
    return logits[0].float().cpu(), cams, upsample_maps(cams, tuple(image.shape[-2:]))


def cam_overlay(rgb: np.ndarray, cam: np.ndarray | torch.Tensor, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """JET heat map of a [0, 1] CAM (resized to the image when needed) blended on a uint8 RGB image."""
    cam = cam.detach().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam)
    height, width = rgb.shape[:2]
    if cam.shape != (height, width):
        cam = cv2.resize(cam.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(cam * 255.0, 0, 255).astype(np.uint8)
    heat = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(np.ascontiguousarray(rgb, dtype=np.uint8), 1.0 - alpha, heat, alpha, 0.0)


def make_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {folder} ({exc.strerror or exc}); choose another output folder") from None
    return folder


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write a uint8 RGB image as PNG (cv2 wants BGR)."""
    path = Path(path)
    make_folder(path.parent)
    if not cv2.imwrite(str(path), cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)):
        raise UserError(f"cannot write {path}; check the folder's permissions and free space")
    return path
