"""A trained classifier, rebuilt from its checkpoint and looked at: its network, its predictions and CAMs.

The research tools (evaluate_classification.py, visualize_cams.py, infer.py, make_cams.py) load runs through
`load_run`; the trainer's TensorBoard images use `denormalize` and `cam_overlay`. Finding files, reading a
run's data and writing images are in tools/run_files.py and tools/run_inputs.py. Every problem a user can
cause raises `UserError`, which the scripts turn into one line on stderr and exit code 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from core.builder import Classifier, classifier_from_config, make_cams
from core.keypoints import upsample_maps
from core.recipe import RUN_DEFINING_FLAGS, flag_defaults
from tools.augment import IMAGENET_MEAN, IMAGENET_STD
from tools.checkpoint import load_checkpoint_and_hash
from tools.errors import UserError
from tools.run_files import resolve_checkpoint
from tools.run_inputs import run_class_names

OVERLAY_ALPHA = 0.5  # weight of the heat map in a CAM overlay


def read_checkpoint(path: Path) -> tuple[dict, str]:
    """(checkpoint, its SHA-256) of this repo's trainer (a dict with 'model' and 'config'), loaded on
    the CPU with weights_only=True: a file that would run code is refused, never unpickled."""
    checkpoint, sha = load_checkpoint_and_hash(path)
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise UserError(f"{path} is not a checkpoint of the training scripts (no 'model'/'config' entries)")
    return checkpoint, sha


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
