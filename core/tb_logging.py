"""Optional TensorBoard logging: a no-op when the `tensorboard` package is not installed.

TensorBoard is an optional extra (pip install tensorboard); nothing in the repo requires it.

How the training loop (core/trainer.py) uses it:

* ``writer = make_writer(log_dir)`` once, on the main process only (rank 0 under torchrun), with
  ``log_dir = <output_dir>/tensorboard/<tag>``. Returns a ``torch.utils.tensorboard.SummaryWriter``,
  or ``None`` -- without raising or warning -- when tensorboard cannot be imported.
* ``log_scalars(writer, step, values)``: ``values`` maps a name (e.g. ``"train/loss"``,
  ``"val/mAP"``) to a number (a Python number or a one-element tensor). Entries that are None or
  not numeric are skipped (NaN is logged). ``step`` is the optimizer iteration.
* ``log_cam_images(writer, step, images, cams)``: ``images`` is the normalised network input
  (B, 3, H, W) as fed to the model (ImageNet mean/std); ``cams`` is one map per image in [0, 1],
  (B, h, w) or (B, 1, h, w) at any resolution (e.g. ``make_cams(features)`` reduced by a max over
  the image's positive classes). Each CAM is upsampled bilinearly to H x W, drawn as a JET overlay
  on the un-normalised image, and the first ``max_images`` are logged as one image batch under
  ``tag``. Tensors may be on any device and may require grad; they are detached and copied.
* Every function accepts ``writer=None`` and then does nothing, so the caller never branches.
* ``close_writer(writer)`` flushes and closes it at the end of training (None is fine).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.inspection import cam_overlay, denormalize
from core.keypoints import upsample_maps


def make_writer(log_dir: str | Path) -> Any | None:
    """A SummaryWriter logging to log_dir, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports the optional `tensorboard` package
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


def _scalar(value: object) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0]) if value.numel() == 1 else None
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        return float(value)
    return None


def log_scalars(writer: Any | None, step: int, values: Mapping[str, object]) -> None:
    """add_scalar for every numeric entry of `values` at `step`."""
    if writer is None:
        return
    for name, value in values.items():
        number = _scalar(value)
        if number is not None:  # NaN is logged: a diverging loss should show
            writer.add_scalar(name, number, step)


def cam_overlays(images: torch.Tensor, cams: torch.Tensor, max_images: int = 4) -> np.ndarray:
    """(N, H, W, 3) uint8 JET overlays of the first max_images CAMs on their un-normalised images."""
    images = images[:max_images].detach().float().cpu()
    cams = cams[:max_images].detach().float().cpu()
    if cams.dim() == 4:
        cams = cams[:, 0]
    maps = upsample_maps(cams, tuple(images.shape[-2:])).clamp(0, 1)
    return np.stack([cam_overlay(rgb, cam) for rgb, cam in zip(denormalize(images), maps)])


def log_cam_images(writer: Any | None, step: int, images: torch.Tensor, cams: torch.Tensor, tag: str = "cams",
                   max_images: int = 4) -> None:
    """Log CAM overlays of a batch as one image grid under `tag` (see the module docstring)."""
    if writer is None or images.shape[0] == 0:
        return
    writer.add_images(tag, cam_overlays(images, cams, max_images), step, dataformats="NHWC")


def close_writer(writer: Any | None) -> None:
    if writer is not None:
        writer.close()
