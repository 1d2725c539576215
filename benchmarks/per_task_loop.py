"""A per-task training iteration in the official scripts' style: the baseline that train_step is timed against.

The official cTopk-w script (method.md sections 2-3) takes the student's CAMs to numpy, finds each
(image, positive class)'s keypoint with scikit-image's `peak_local_max` on that class's upsampled
map (rule B), then makes ONE patch-network call per task on its four nearest-resized quadrants,
stitches the tile maps back with per-quadrant resizes and concatenations, and sums the losses
task by task. `per_task_step` does exactly that with the project's networks and optimiser
(a StepContext from core.step.build_step): each call with a one-call `bn_plan`, i.e. the same
BatchNorm semantics as the batched step, so that both compute the same losses and updates and
differ only in how the work is batched. The maps are upsampled with torch's bilinear rather than
cv2's INTER_LINEAR (the same formula to about 1 ulp, method.md section 3), so that the keypoints
agree bit for bit with the batched rules.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import peak_local_max

from core.batchnorm import BNPlan
from core.builder import make_cams
from core.step import (
    StepContext,
    alpha_re_at,
    classification_loss,
    device_images,
    lr_factor,
    student_plan,
    update_teacher,
)
from tools.errors import UserError


def rule_b_keypoint(cam: np.ndarray, k: int, min_distance: int) -> tuple[int, int]:
    """cTopk-w's keypoint of one upsampled map, as the reference computes it (numpy scalars, each term truncated)."""
    centre = (cam.shape[0] // 2, cam.shape[1] // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # skimage warns for min_distance 0
        peaks = peak_local_max(cam, min_distance=min_distance)
    if len(peaks) == 0:
        return centre
    values = [cam[p[0], p[1]] for p in peaks]  # float32 scalars, in skimage's order
    order = np.argsort(-np.array(values))
    chosen = list(order) if len(peaks) <= k else list(order[:k])
    total = 0
    for i in (range(len(values)) if len(peaks) <= k else chosen):  # the reference's summation orders
        total += values[i]
    y = x = 0
    for i in chosen:  # int64 coordinate * float32 value / float32 sum: float64, truncated term by term
        y += int(peaks[i][0] * values[i] / total)
        x += int(peaks[i][1] * values[i] / total)
    return centre if y == 0 or x == 0 else (y, x)


def quadrants(image: torch.Tensor, y: int, x: int) -> torch.Tensor:
    """The four quadrants of one image cut at (y, x), each resized (nearest) to half the image: (4, C, H/2, W/2)."""
    half = [image.shape[-2] // 2, image.shape[-1] // 2]
    parts = (image[:, :y, :x], image[:, :y, x:], image[:, y:, :x], image[:, y:, x:])
    return torch.cat([F.interpolate(part[None], size=half, mode="nearest") for part in parts])


def stitch(tile_maps: torch.Tensor, y: int, x: int, grid: tuple[int, int], stride: int = 16) -> torch.Tensor:
    """The four tiles' maps resized (nearest) to their shares of the grid cut at (y // 16, x // 16): (1, C, h, w)."""
    gy, gx = max(y // stride, 1), max(x // stride, 1)
    height, width = grid
    sizes = ((gy, gx), (gy, width - gx), (height - gy, gx), (height - gy, width - gx))
    parts = [F.interpolate(tile_maps[i:i + 1], size=list(size), mode="nearest") for i, size in enumerate(sizes)]
    return torch.cat([torch.cat(parts[:2], 3), torch.cat(parts[2:], 3)], 2)


def check_supported(ctx: StepContext) -> None:
    args = ctx.args
    if args.strategy != "ctopk_w" or args.keypoint_rule != "reference" or ctx.teacher is None:
        raise UserError("the per-task loop is the reference's cTopk-w: --strategy ctopk_w with the EMA teacher "
                        "and --keypoint_rule reference")


def puzzle_terms(ctx: StepContext, images: torch.Tensor, features: torch.Tensor, labels_cpu: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums over tasks of p_class and re, and the number of tasks: one teacher call per task."""
    args, teacher = ctx.args, ctx.teacher
    height, width = images.shape[-2:]
    cams = make_cams(features.detach().float()).cpu()  # the reference's CAMs, to the host once
    p_class = re = features.new_zeros(())
    tasks = labels_cpu.nonzero().tolist()  # (image, class), image-major: the reference's loop order
    call = BNPlan.for_calls(4, args.reference_gpus)
    for image, cls in tasks:
        up = F.interpolate(cams[image, cls][None, None], size=[height, width], mode="bilinear", align_corners=False)
        y, x = rule_b_keypoint(up[0, 0].numpy(), args.k, args.min_distance)
        tiles = quadrants(images[image], y, x)
        with torch.no_grad(), torch.autocast(**ctx.autocast):
            tile_maps = teacher(tiles, bn_plan=call)[1].float()
        rebuilt = stitch(tile_maps, y, x, tuple(features.shape[-2:]))
        target = torch.zeros(1, features.shape[1], device=features.device)
        target[0, cls] = 1.0
        p_class = p_class + F.multilabel_soft_margin_loss(rebuilt.mean((2, 3)), target)
        error = (features[image].float() - rebuilt[0]).abs() if args.re_loss == "L1_Loss" else \
            (features[image].float() - rebuilt[0]).square()
        if args.re_loss_option == "masking":
            error = error * target[0, :, None, None]
        re = re + error.mean()
    return p_class, re, len(tasks)


def per_task_step(ctx: StepContext, images: torch.Tensor, labels_cpu: torch.Tensor, iteration: int,
                  total: int) -> torch.Tensor:
    """One reference-style iteration; returns [loss, class, p_class, re, tasks] like train_step's first five stats."""
    check_supported(ctx)
    args = ctx.args
    factor = lr_factor(args, iteration, total)
    for group, lr0 in zip(ctx.optimizer.param_groups, ctx.base_lrs):
        group["lr"] = lr0 * factor
    images = device_images(images, ctx.device, ctx.channels_last)  # the loader's uint8 batches, as train_step
    labels = labels_cpu.to(ctx.device)
    with torch.autocast(**ctx.autocast):
        logits, features = ctx.student(images, bn_plan=student_plan(args, images.shape[0]))
        class_loss = classification_loss(logits.float(), labels)
    p_class, re, count = puzzle_terms(ctx, images, features, labels_cpu)
    p_class, re = p_class / max(count, 1), re / max(count, 1)
    loss = class_loss + args.alpha_p * p_class + alpha_re_at(args, iteration, total) * re
    ctx.scaler.scale(loss).backward()
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    update_teacher(ctx.bare_teacher, ctx.bare_student, iteration, args.alpha_ema)
    return torch.stack([loss.detach(), class_loss.detach(), p_class.detach(), re.detach(),
                        torch.tensor(float(count), device=loss.device)])
