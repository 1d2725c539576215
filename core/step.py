"""One optimisation step: the classification loss plus the strategy's puzzle tasks, then the EMA teacher.

`build_step` makes everything a step needs (student, teacher, optimiser, scaler); `train_step`
runs one iteration and returns its `StepStats` by name. The loss terms and their weights live in
`loss_terms` (method.md sections 2 and 4): a new term is one more entry there, and the loop logs it.
The training loop and benchmarks/train_speed.py both use `build_step` and `train_step`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.batchnorm import BNPlan
from core.builder import Classifier, make_cams, parameter_groups, poly_lr_factor
from core.puzzle import grid_cuts_from_pixel_cuts, split_at_keypoints, stitch_tiles
from core.runtime import Runtime, autocast_settings, unwrap, wrap_for_devices
from core.strategies import STRATEGIES, Strategy, build_tasks
from tools.augment import PackedImages, normalize_packed
from tools.demo_backbone import demo_backbone_state

# --patch_chunk auto. A tile's largest activation in the patch network: the stem's 64 channels at half
# the tile's side (a Bottleneck layer1's 256 channels at a quarter of it hold as many values).
STEM_CHANNELS = 64
# CPU: that activation of one forward stays within 8 MiB. Above it glibc's malloc serves such tensors from
# fresh pages, whose page faults cost more than running more, smaller forwards; well below it the per-forward
# overhead of small batches shows (the measurements: benchmarks/README.md, --patch_chunk).
CPU_ACTIVATION_BUDGET = 8 * 2**20
# CUDA: one forward, unless about this many of the largest activations (alive at once in a forward
# without gradient) for all tiles would take more than half of the memory still free.
CUDA_LIVE_ACTIVATIONS = 4


class LossTerm(NamedTuple):
    """One term of the loss: its name in logs and history, its weight (None: unweighted) and its value."""

    name: str
    weight: float | None
    value: torch.Tensor


@dataclass(frozen=True)
class StepStats:
    """A step's statistics by name, in one tensor on the device: reading a value syncs, the step never does.

    The total loss and its terms come first (`losses` names), then the other logged statistics, then the
    checks that the loop's guards read but do not log (up to `logged`, a name is logged). A position or a
    slice reads that tensor directly (stats[1:4]: the class, p_class and re losses), a name one value.
    """

    names: tuple[str, ...]
    values: torch.Tensor
    losses: int
    logged: int

    @classmethod
    def of(cls, losses: dict[str, torch.Tensor], others: dict[str, torch.Tensor],
           checks: dict[str, torch.Tensor] | None = None) -> StepStats:
        named = {**losses, **others, **(checks or {})}
        return cls(tuple(named), torch.stack(list(named.values())), len(losses), len(losses) + len(others))

    def __getitem__(self, key: int | slice | str) -> torch.Tensor:
        return self.values[self.names.index(key)] if isinstance(key, str) else self.values[key]

    def with_values(self, values: torch.Tensor) -> StepStats:
        return StepStats(self.names, values, self.losses, self.logged)

    @property
    def loss_names(self) -> tuple[str, ...]:
        return self.names[:self.losses]

    @property
    def logged_names(self) -> tuple[str, ...]:
        return self.names[:self.logged]


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


def freeze_as_teacher(network: nn.Module) -> nn.Module:
    """The reference builds the teacher as an independent network (its own random heads) and detaches
    its parameters; the first update (a = 0) makes them the student's. It stays in train mode."""
    for param in network.parameters():
        param.requires_grad_(False)
    return network.train()


def ema_momentum(step: int, alpha_ema: float) -> float:
    """a = min(1 - 1/(step + 1), alpha_ema): the teacher follows the student closely at first."""
    return min(1.0 - 1.0 / (step + 1), alpha_ema)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, step: int, alpha_ema: float) -> None:
    """teacher <- a * teacher + (1 - a) * student, parameters only: BatchNorm buffers stay the teacher's own."""
    a = ema_momentum(step, alpha_ema)
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - a)


@dataclass
class StepContext:
    strategy: Strategy
    student: nn.Module  # as called: maybe wrapped in DDP / DataParallel
    teacher: nn.Module | None  # the patch network when it is the EMA teacher (maybe wrapped)
    args: argparse.Namespace
    autocast: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lrs: list[float]
    device: torch.device
    distributed: bool = False
    channels_last: bool = False  # used on CUDA

    @property
    def bare_student(self) -> nn.Module:
        return unwrap(self.student)

    @property
    def bare_teacher(self) -> nn.Module | None:
        return unwrap(self.teacher) if self.teacher is not None else None


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, args.lr, args.wd), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov)


def build_model(args: argparse.Namespace, num_classes: int = 20) -> Classifier:
    # --pretrained demo: the demo's stand-in for ImageNet (tools/demo_backbone.py), resolved here so that the
    # model itself knows only weights
    pretrained = demo_backbone_state() if args.pretrained == "demo" else args.pretrained
    return Classifier(args.architecture, num_classes=num_classes, mode=args.mode, pretrained=pretrained,
                      head=args.head)


def build_step(args: argparse.Namespace, runtime: Runtime, num_classes: int = 20) -> StepContext:
    """Student, EMA teacher (strategies that cut through it), optimiser and scaler, on the run's device."""
    strategy = STRATEGIES[args.strategy]
    student = build_model(args, num_classes).to(runtime.device)
    teacher = None
    if strategy.puzzle and args.patch_network == "teacher":  # built after the student, as the reference does
        teacher = freeze_as_teacher(build_model(args, num_classes).to(runtime.device))
    channels_last = runtime.device.type == "cuda"
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    optimizer = build_optimizer(student, args)
    return StepContext(
        strategy, wrap_for_devices(student, runtime, trainable=True),
        wrap_for_devices(teacher, runtime, trainable=False) if teacher is not None else None,
        args, autocast_settings(runtime.device, args.amp), optimizer,
        torch.amp.GradScaler("cuda", enabled=args.amp == "fp16"), [g["lr"] for g in optimizer.param_groups],
        runtime.device, runtime.distributed, channels_last)


def student_plan(args: argparse.Namespace, micro_batch: int) -> BNPlan:
    """The reference called the student once per batch; DataParallel cut it into reference_gpus chunks."""
    return BNPlan(args.batch_size // args.reference_gpus, micro_batch)


def tile_plan(args: argparse.Namespace, num_tiles: int) -> BNPlan:
    """--tile_calls task: one call of 4 tiles per task. batch: one call holding every tile, ordered by
    quadrant (the caller reorders the tiles so)."""
    call = num_tiles if args.tile_calls == "batch" else 4
    # --patch_bn_update off: the student's tile calls leave the running statistics to its batch calls
    update = args.patch_bn_update == "reference" or args.patch_network == "teacher"
    return BNPlan.for_calls(call, args.reference_gpus, update)


def auto_patch_chunk(device: torch.device, num_tiles: int, tile_h: int, tile_w: int, itemsize: int = 4) -> int:
    """Tiles per forward for --patch_chunk auto (0 = one forward), whole tasks of 4 tiles, at least one task."""
    per_tile = STEM_CHANNELS * math.ceil(tile_h / 2) * math.ceil(tile_w / 2) * itemsize
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget, per_tile = (free + cached) // 2, per_tile * CUDA_LIVE_ACTIVATIONS
    else:
        budget = CPU_ACTIVATION_BUDGET
    chunk = budget // per_tile // 4 * 4
    return 0 if chunk >= num_tiles else max(chunk, 4)


def patch_features(network: nn.Module, tiles: torch.Tensor, plan: BNPlan, chunk: int, no_grad: bool) -> torch.Tensor:
    """Class maps of all tiles, in chunks of `chunk` tiles (whole calls) when memory or speed needs it."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
        if chunk <= 0 or tiles.shape[0] <= chunk:
            return network(tiles, bn_plan=plan)[1]
        chunk = max(plan.call_size, chunk // plan.call_size * plan.call_size)
        return torch.cat([network(part, bn_plan=plan)[1] for part in torch.split(tiles, chunk)])


def tile_maps_of_tasks(ctx: StepContext, images: torch.Tensor, image_index: torch.Tensor,
                       cuts: torch.Tensor) -> torch.Tensor:
    """The patch network's class maps of every task's four tiles, task-major (4N, C, h/2, w/2)."""
    args = ctx.args
    tiles = split_at_keypoints(images, image_index, cuts)
    one_call = args.tile_calls == "batch"  # parse_args resolves the flag to the strategy's when not given
    if one_call:  # Puzzle-CAM's one call is ordered by quadrant: all top-left tiles first, ...
        tiles = tiles.unflatten(0, (-1, 4)).transpose(0, 1).flatten(0, 1)
    # the same memory layout as the images, so that DDP's gradient buckets keep their layout
    tiles = tiles.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    use_teacher = args.patch_network == "teacher"
    network = ctx.teacher if use_teacher else ctx.student
    chunk = 0 if one_call else args.patch_chunk
    if chunk == "auto":  # autocast runs the convolutions in 2-byte floats
        chunk = auto_patch_chunk(tiles.device, tiles.shape[0], *tiles.shape[-2:],
                                 2 if ctx.autocast["enabled"] else tiles.element_size())
    with torch.autocast(**ctx.autocast):
        maps = patch_features(network, tiles, tile_plan(args, tiles.shape[0]), chunk, use_teacher)
    if one_call:
        maps = maps.unflatten(0, (4, -1)).transpose(0, 1).flatten(0, 1)
    return maps.float()


def loss_terms(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
               alpha_re: float) -> tuple[list[LossTerm], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The loss terms of a micro-batch (the first unweighted), the step's other statistics (logged) and its
    checks (read by the loop's guards, not logged), all on the device.

    A new term is one more LossTerm here: the total, the history and the log follow its name.
    """
    args = ctx.args
    with torch.autocast(**ctx.autocast):
        logits, features = ctx.student(images, bn_plan=student_plan(args, images.shape[0]))
        class_loss = classification_loss(logits.float(), labels)
    zero = class_loss.detach() * 0
    p_class_loss = re_loss = zero
    num_tasks, distance, outside = zero, zero, zero
    if ctx.strategy.puzzle:
        height, width = images.shape[-2:]
        tasks = build_tasks(ctx.strategy, make_cams(features.detach().float()), labels, labels_cpu,
                            (height, width), args.k, args.min_distance, args.keypoint_rule,
                            radius=height // 4)  # the reference's 128 px at 512 px
        cuts = tasks.keypoints
        tile_maps = tile_maps_of_tasks(ctx, images, tasks.image_index, cuts)
        stitched = stitch_tiles(tile_maps, grid_cuts_from_pixel_cuts(cuts), tuple(features.shape[-2:]))
        p_class_loss, re_loss = puzzle_losses(features.float(), stitched, tasks.image_index, tasks.targets,
                                              args.re_loss, args.re_loss_option == "masking")
        num_tasks = zero + len(tasks)
        # from Python scalars: no host-to-device copy, no sync
        distance = torch.hypot(cuts[:, 0] - height / 2, cuts[:, 1] - width / 2).mean() if len(tasks) else zero
        if tasks.outside is not None:  # a count on the device: the trainer reads it at its next sync
            outside = zero + tasks.outside
    terms = [LossTerm("class_loss", None, class_loss), LossTerm("p_class_loss", args.alpha_p, p_class_loss),
             LossTerm("re_loss", alpha_re, re_loss)]
    # cuts_outside: the strategy's cuts outside [1, size - 1] (core/strategies.py), a check of the plug-in contract
    return terms, {"tasks_per_batch": num_tasks, "keypoint_distance": distance}, {"cuts_outside": outside}


def forward_losses(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
                   alpha_re: float) -> tuple[torch.Tensor, StepStats]:
    """Total loss of a micro-batch (the weighted sum of loss_terms, in their order) and its stats."""
    terms, others, checks = loss_terms(ctx, images, labels, labels_cpu, alpha_re)
    loss = terms[0].value
    for term in terms[1:]:
        loss = loss + term.weight * term.value
    losses = {"loss": loss.detach(), **{term.name: term.value.detach() for term in terms}}
    return loss, StepStats.of(losses, others, checks)


def device_images(images: torch.Tensor | PackedImages, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A micro-batch's images on the device, normalised: the loader's uint8 PackedImages are copied as bytes
    (a quarter of float32's traffic) and normalised there; a float tensor (tests, tools) is only moved."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(images, PackedImages):
        pixels = images.pixels.to(device, non_blocking=True).contiguous(memory_format=layout)
        return normalize_packed(PackedImages(pixels, images.boxes.to(device, non_blocking=True)))  # keeps the layout
    return images.to(device, non_blocking=True).contiguous(memory_format=layout)


def train_step(ctx: StepContext, micro_batches: list, iteration: int, total: int) -> StepStats:
    """One optimizer step of iteration `iteration` of `total` over its micro-batches [(images, labels)] (images:
    a float batch or the loader's uint8 PackedImages):
    poly lr and alpha_re, forward/backward of each micro-batch, the step, the EMA teacher update.
    Returns the micro-batch mean of forward_losses' stats, on the device (no sync)."""
    factor = lr_factor(ctx.args, iteration, total)
    for group, lr0 in zip(ctx.optimizer.param_groups, ctx.base_lrs):
        group["lr"] = lr0 * factor
    alpha_re = alpha_re_at(ctx.args, iteration, total)
    count = len(micro_batches)
    mean, stats = 0.0, None
    for micro, (images, labels_cpu) in enumerate(micro_batches):
        images = device_images(images, ctx.device, ctx.channels_last)
        labels = labels_cpu.to(ctx.device, non_blocking=True)
        # DDP: all-reduce the gradients only once, after the last micro-batch
        no_sync = ctx.distributed and micro < count - 1
        with ctx.student.no_sync() if no_sync else contextlib.nullcontext():
            loss, stats = forward_losses(ctx, images, labels, labels_cpu, alpha_re)
            ctx.scaler.scale(loss / count).backward()
        mean = mean + stats.values / count
    if ctx.args.clip_grad_norm > 0:  # a guard, off in the reference (docs/miniature.md: why a demo run can collapse)
        ctx.scaler.unscale_(ctx.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.bare_student.parameters(), ctx.args.clip_grad_norm)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.teacher is not None:
        update_teacher(ctx.bare_teacher, ctx.bare_student, iteration, ctx.args.alpha_ema)
    return stats.with_values(mean)


def alpha_re_at(args: argparse.Namespace, iteration: int, total: int) -> float:
    """alpha_re(t) = min(alpha_re * t / (T * alpha_schedule_re), alpha_re); schedule 0: constant (Puzzle-CAM)."""
    if args.alpha_schedule_re == 0:
        return args.alpha_re
    return min(args.alpha_re * iteration / (total * args.alpha_schedule_re), args.alpha_re)


def lr_factor(args: argparse.Namespace, iteration: int, total: int) -> float:
    """The reference's lr multiplier: its step warm-up while iteration < (warmup_epoch - 1) * E, then poly.

    E is the reference's hard-coded 661 iterations per epoch unless --warmup_epoch_iterations says otherwise.
    """
    epoch_steps = args.warmup_epoch_iterations
    if iteration < (args.warmup_epoch - 1) * epoch_steps:
        return (iteration // epoch_steps + 1) / args.warmup_epoch
    return poly_lr_factor(iteration, total)
