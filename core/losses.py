"""Losses of the classifier and of the puzzle tasks (method.md sections 2 and 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.multilabel_soft_margin_loss(logits, targets)


def puzzle_losses(features: torch.Tensor, stitched: torch.Tensor, image_index: torch.Tensor,
                  targets: torch.Tensor, re_loss: str = "L1_Loss", masking: bool = True,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(p_class_loss, re_loss), each a mean over all tasks of the batch.

    features: the student's raw class maps (B, C, h, w); stitched: one map per task (N, C, h, w);
    image_index: the image of each task; targets: each task's target (N, C).
    The re-construction error is masked to the task's target classes and averaged over all elements.
    """
    if stitched.shape[0] == 0:  # no task in this batch (no image had a label)
        zero = features.sum() * 0.0
        return zero, zero
    p_class = F.multilabel_soft_margin_loss(stitched.mean(dim=(2, 3)), targets)
    diff = features[image_index] - stitched
    error = diff.abs() if re_loss == "L1_Loss" else diff.square()
    if masking:
        error = error * targets[:, :, None, None]
    return p_class, error.mean()
