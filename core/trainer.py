"""The one training loop behind every script: classification + the strategy's puzzle tasks."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.builder import Classifier, make_cams, parameter_groups, poly_lr_factor
from core.config import autocast_settings, choose_device, parse_args
from core.ema import make_teacher, update_teacher
from core.losses import classification_loss, puzzle_losses
from core.puzzle import clamp_keypoints, grid_cuts_from_pixel_cuts, split_at_keypoints, stitch_tiles
from core.strategies import STRATEGIES, Strategy, build_tasks
from tools.augment import EvalTransform, TrainTransform
from tools.checkpoint import restart_from_checkpoint, save_checkpoint, write_json
from tools.demo_data import default_demo_root, generate_demo_dataset
from tools.errors import UserError, run_cli
from tools.metrics import chance_map, mean_average_precision
from tools.tb_logging import close_writer, log_cam_images, log_scalars, make_writer
from tools.voc import VOCClassification, load_split, resolve_voc_root

LOSS_TERMS = ("loss", "class_loss", "p_class_loss", "re_loss")


def main(defaults: dict) -> None:
    """Entry point of the training scripts: each passes only its defaults."""
    run_cli(lambda: train(parse_args(defaults)))


# ----------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(args: argparse.Namespace) -> Runtime:
    """Pick the device; under torchrun, join the process group (NCCL on CUDA, gloo on CPU)."""
    device = choose_device(args.device)
    if args.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or --amp off on the CPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None and world_size > 1:
        device = torch.device("cuda", local_rank)
    if args.batch_size % (world_size * args.accum_steps):
        raise UserError(
            f"--batch_size {args.batch_size} is not divisible by world size {world_size} x --accum_steps "
            f"{args.accum_steps}; pick a multiple of {world_size * args.accum_steps}"
        )
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size, local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data
class EpochBatchSampler:
    """Batches of (index, augmentation seed) keys, a pure function of (seed, epoch, position).

    Every image's augmentation depends only on its key, so a resumed run (or one split over
    several processes or micro-batches) sees exactly the same samples as an uninterrupted one.
    The global batch is the same whatever the world size: rank r takes its contiguous share.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 accum_steps: int = 1) -> None:
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.accum_steps = rank, world_size, accum_steps
        self.micro = batch_size // (world_size * accum_steps)
        self.iterations_per_epoch = num_items // batch_size  # the last partial batch is dropped
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        self.epoch, self.start = epoch, start_iteration

    def sample_seed(self, position: int) -> int:
        """One integer per (seed, epoch, position); numpy's SeedSequence decorrelates nearby values."""
        return (self.seed << 40) + (self.epoch << 24) + position

    def __len__(self) -> int:
        return (self.iterations_per_epoch - self.start) * self.accum_steps

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + 7919 * self.epoch))
        share = self.batch_size // self.world_size
        for it in range(self.start, self.iterations_per_epoch):
            first = it * self.batch_size + self.rank * share
            for m in range(self.accum_steps):
                positions = range(first + m * self.micro, first + (m + 1) * self.micro)
                yield [(int(order[p]), self.sample_seed(p)) for p in positions]


def resolve_data_root(args: argparse.Namespace, runtime: Runtime) -> Path:
    if not args.demo:
        return resolve_voc_root(args.data_dir)
    root = Path(args.data_dir) if args.data_dir else default_demo_root()
    if runtime.is_main:
        generate_demo_dataset(root)
    if runtime.distributed:
        dist.barrier()
    return root


def make_loader(dataset, batch_sampler, args: argparse.Namespace, runtime: Runtime) -> DataLoader:
    workers = args.num_workers
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                      pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- outputs
@dataclass
class RunFiles:
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


# ----------------------------------------------------------------------------- model step
def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def patch_features(network: nn.Module, tiles: torch.Tensor, chunk: int, no_grad: bool) -> torch.Tensor:
    """Class maps of all tiles, in chunks of `chunk` tiles when memory needs it (0 = one forward)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not no_grad):
        if chunk <= 0 or tiles.shape[0] <= chunk:
            return network(tiles)[1]
        return torch.cat([network(part)[1] for part in torch.split(tiles, chunk)])


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
    channels_last: bool = False  # the trainer uses it on CUDA


def forward_losses(ctx: StepContext, images: torch.Tensor, labels: torch.Tensor, labels_cpu: torch.Tensor,
                   alpha_re: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Total loss of a micro-batch and its stats [loss, class, p_class, re, tasks, keypoint distance]."""
    args = ctx.args
    with torch.autocast(**ctx.autocast):
        logits, features = ctx.student(images)
        class_loss = classification_loss(logits.float(), labels)
    zero = class_loss.detach() * 0
    p_class_loss = re_loss = zero
    num_tasks, distance = zero, zero
    if ctx.strategy.puzzle:
        height, width = images.shape[-2:]
        tasks = build_tasks(ctx.strategy, make_cams(features.detach().float()), labels, labels_cpu,
                            (height, width), args.k, args.min_distance)
        cuts = clamp_keypoints(tasks.keypoints, height, width)
        tiles = split_at_keypoints(images, tasks.image_index, cuts)
        # the same memory layout as the images, so that DDP's gradient buckets keep their layout
        tiles = tiles.contiguous(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
        use_teacher = args.patch_network == "teacher"
        network = ctx.teacher if use_teacher else ctx.student
        with torch.autocast(**ctx.autocast):
            tile_maps = patch_features(network, tiles, args.patch_chunk, no_grad=use_teacher)
        stitched = stitch_tiles(tile_maps.float(), grid_cuts_from_pixel_cuts(cuts), tuple(features.shape[-2:]))
        p_class_loss, re_loss = puzzle_losses(features.float(), stitched, tasks.image_index, tasks.targets,
                                              args.re_loss, args.re_loss_option == "masking")
        num_tasks = zero + len(tasks)
        # from Python scalars: no host-to-device copy, no sync
        distance = torch.hypot(cuts[:, 0] - height / 2, cuts[:, 1] - width / 2).mean() if len(tasks) else zero
    loss = class_loss + args.alpha_p * p_class_loss + alpha_re * re_loss
    stats = torch.stack([loss.detach(), class_loss.detach(), p_class_loss.detach(), re_loss.detach(),
                         num_tasks, distance])
    return loss, stats


def train_step(ctx: StepContext, micro_batches: list, iteration: int, total: int) -> torch.Tensor:
    """One optimizer step of iteration `iteration` of `total` over its micro-batches [(images, labels)]:
    poly lr and alpha_re, forward/backward of each micro-batch, the step, the EMA teacher update.
    Returns the micro-batch mean of forward_losses' stats, on the device (no sync)."""
    factor = poly_lr_factor(iteration, total)
    for group, lr0 in zip(ctx.optimizer.param_groups, ctx.base_lrs):
        group["lr"] = lr0 * factor
    alpha_re = alpha_re_at(ctx.args, iteration, total)
    count = len(micro_batches)
    mean_stats = 0.0
    for micro, (images, labels_cpu) in enumerate(micro_batches):
        images = images.to(ctx.device, non_blocking=True)
        if ctx.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels_cpu.to(ctx.device, non_blocking=True)
        # DDP: all-reduce the gradients only once, after the last micro-batch
        no_sync = ctx.distributed and micro < count - 1
        with ctx.student.no_sync() if no_sync else contextlib.nullcontext():
            loss, stats = forward_losses(ctx, images, labels, labels_cpu, alpha_re)
            ctx.scaler.scale(loss / count).backward()
        mean_stats = mean_stats + stats / count
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.teacher is not None:
        update_teacher(unwrap(ctx.teacher), unwrap(ctx.student), iteration, ctx.args.alpha_ema)
    return mean_stats


def alpha_re_at(args: argparse.Namespace, iteration: int, total: int) -> float:
    """alpha_re(t) = min(alpha_re * t / (T * alpha_schedule_re), alpha_re)."""
    return min(args.alpha_re * iteration / (total * args.alpha_schedule_re), args.alpha_re)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, dataset, indices: list[int], args, runtime: Runtime, autocast: dict,
            desc: str) -> np.ndarray:
    """Logits of `indices` (in that order) with the evaluation transform."""
    model.eval()
    batches = [indices[i:i + args.eval_batch_size] for i in range(0, len(indices), args.eval_batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers,
                        pin_memory=runtime.device.type == "cuda")
    scores = []
    for images, _, _ in tqdm(loader, desc=desc, leave=False, disable=not runtime.is_main, dynamic_ncols=True):
        images = images.to(runtime.device, non_blocking=True)
        if runtime.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**autocast):
            logits, _ = model(images)
        scores.append(logits.float().cpu())
    model.train()
    return torch.cat(scores).numpy() if scores else np.zeros((0, 20), np.float32)


def evaluate(model: nn.Module, dataset, targets: np.ndarray, ignore: np.ndarray, args, runtime: Runtime,
             autocast: dict, desc: str = "eval") -> dict:
    """mAP (reference AP) and mAP_voc (devkit AP) over every image of the split, each counted once."""
    n = len(dataset)
    shard = list(range(runtime.rank, n, runtime.world_size))
    scores = predict(model, dataset, shard, args, runtime, autocast, desc)
    if runtime.distributed:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, (shard, scores))
        full = np.zeros((n, targets.shape[1]), np.float32)
        seen = np.zeros(n, np.int64)
        for idx, part in gathered:
            full[idx] = part
            seen[idx] += 1
        assert (seen == 1).all(), "every validation image must be scored exactly once"
        scores = full
    m_ref, ap_ref = mean_average_precision(scores, targets, kind="reference")
    m_voc, ap_voc = mean_average_precision(scores, targets, ignore=ignore, kind="voc")
    return {"mAP": m_ref, "mAP_voc": m_voc, "ap": ap_ref.tolist(), "ap_voc": ap_voc.tolist(), "num_images": n}


@torch.no_grad()
def log_val_cams(writer, iteration: int, model: nn.Module, dataset, device: torch.device, count: int = 4) -> None:
    """TensorBoard: CAMs (max over each image's labelled classes) of the first validation images."""
    images, labels, _ = zip(*(dataset[i] for i in range(min(count, len(dataset)))))
    images, labels = torch.stack(images).to(device), torch.stack(labels).to(device)
    model.eval()
    _, features = model(images)
    model.train()
    merged = (make_cams(features.float()) * labels[:, :, None, None]).amax(dim=1)
    log_cam_images(writer, iteration, images, merged)


# ----------------------------------------------------------------------------- training
class StopRequest:
    """SIGINT/SIGTERM ask the loop to save and exit at the end of the current iteration."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, args.lr, args.wd), lr=args.lr, momentum=args.momentum,
                           nesterov=args.nesterov)


def wrap_for_devices(model: nn.Module, runtime: Runtime, trainable: bool) -> nn.Module:
    if runtime.distributed and trainable:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if not runtime.distributed and runtime.device.type == "cuda" and torch.cuda.device_count() > 1:
        return nn.DataParallel(model)  # the original's multi-GPU mode
    return model


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def describe_config(args: argparse.Namespace, extra: dict) -> str:
    lines = ["# config"] + [f"{k}: {v}" for k, v in sorted(vars(args).items())]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    return "\n".join(lines)


def train(args: argparse.Namespace) -> dict:
    runtime = setup_runtime(args)
    seed_everything(args.seed)
    strategy = STRATEGIES[args.strategy]
    # data first: a wrong path or split is reported before anything is written
    root = resolve_data_root(args, runtime)
    train_split = load_split(root, args.train_split)
    val_split = load_split(root, args.val_split)
    files = RunFiles(Path(args.output_dir), args.tag)
    if runtime.is_main:
        files.prepare(args.resume, args.overwrite)
    train_set = VOCClassification(root, train_split, TrainTransform(args.image_size, args.min_image_size,
                                                                   args.max_image_size), args.skip_bad_images)
    val_set = VOCClassification(root, val_split, EvalTransform(args.image_size), args.skip_bad_images)
    val_targets = np.stack([a.labels for a in val_split.annotations])
    val_ignore = np.stack([a.difficult_only for a in val_split.annotations])
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, runtime.rank, runtime.world_size,
                                args.accum_steps)
    if sampler.iterations_per_epoch < 1:
        raise UserError(f"split '{args.train_split}' has {len(train_set)} images, fewer than --batch_size "
                        f"{args.batch_size}; lower --batch_size")
    iters_per_epoch = sampler.iterations_per_epoch
    total = args.max_epoch * iters_per_epoch
    stop_at = min(total, args.max_iterations or total)
    loader = make_loader(train_set, sampler, args, runtime)

    # model
    student = Classifier(args.architecture, mode=args.mode, pretrained=args.pretrained).to(runtime.device)
    teacher = make_teacher(student) if (strategy.puzzle and args.patch_network == "teacher") else None
    if runtime.device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
    optimizer = build_optimizer(student, args)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
    autocast = autocast_settings(runtime.device, args.amp)

    history = History(config=vars(args).copy())
    start_iteration, best_map = 0, -1.0
    if args.resume:
        ckpt = restart_from_checkpoint(files.checkpoint("last"), model=student, teacher=teacher,
                                       optimizer=optimizer, scaler=scaler)
        start_iteration, best_map = ckpt["iteration"], ckpt["best_mAP"]
        history = History.from_dict(ckpt["history"], config=vars(args).copy())
        set_rng_states(ckpt["rng"])
    chance = chance_map(val_targets)
    history.extra.update({"chance_mAP": chance, "strategy_summary": strategy.summary, "script": Path(sys.argv[0]).name,
                          "iterations_per_epoch": iters_per_epoch, "total_iterations": total})
    log = Logger(files.log, runtime.is_main, append=args.resume)
    if runtime.is_main:
        if args.resume:
            log(f"# resumed from {files.checkpoint('last')} at iteration {start_iteration}")
        else:
            log(describe_config(args, {"data_root": root, "train_images": len(train_set),
                                       "val_images": len(val_set), "world_size": runtime.world_size,
                                       "device": runtime.device}))
        log(f"# strategy {strategy.name}: {strategy.summary}; patch network: {args.patch_network}")
        log(f"# chance level of val mAP (mean AP of random scores): {chance:.2f}%")

    writer = make_writer(files.root / "tensorboard" / args.tag) if runtime.is_main else None  # optional extra
    ddp_student = wrap_for_devices(student, runtime, trainable=True)
    patch_teacher = wrap_for_devices(teacher, runtime, trainable=False) if teacher is not None else None
    ctx = StepContext(strategy, ddp_student, patch_teacher, args, autocast, optimizer, scaler, base_lrs,
                      runtime.device, runtime.distributed, channels_last=runtime.device.type == "cuda")
    log_every = max(1, int(iters_per_epoch * args.print_ratio))
    window = torch.zeros(6, device=runtime.device)
    window_steps, window_start = 0, time.time()
    bad = torch.full((7,), -1.0, device=runtime.device)  # first non-finite step: iteration + its stats
    stop = StopRequest()
    wall_start = time.time() - history.extra.get("wall_time", 0.0)

    def checkpoint_state(iteration: int) -> dict:
        history.extra["wall_time"] = time.time() - wall_start
        return {"model": student.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                "epoch": iteration / iters_per_epoch, "best_mAP": best_map, "config": vars(args).copy(),
                "history": history.as_dict(), "rng": rng_states()}

    def check_finite() -> None:
        values = bad.tolist()
        if values[0] >= 0:
            terms = ", ".join(f"{n}={v:.4g}" for n, v in zip(LOSS_TERMS, values[1:5]))
            raise UserError(
                f"non-finite loss at iteration {int(values[0])} ({terms}); stopped without saving, "
                f"{files.checkpoint('last')} keeps the last good state — lower --lr or the loss weights"
            )

    def check_weights(iteration: int) -> None:
        """A step can overflow the weights even when its loss was finite: never save those."""
        if not torch.stack([p.detach().isfinite().all() for p in student.parameters()]).all():
            raise UserError(
                f"non-finite weights after iteration {iteration} (the loss diverged); stopped without saving, "
                f"{files.checkpoint('last')} keeps the last good state — lower --lr or the loss weights"
            )

    def save_last(iteration: int) -> None:
        check_finite()
        check_weights(iteration)
        if runtime.is_main:
            save_checkpoint(checkpoint_state(iteration), files.checkpoint("last"))
            write_json(history.as_dict(), files.history)

    iteration = start_iteration
    epoch = iteration // iters_per_epoch
    batches = None
    progress = tqdm(total=stop_at, initial=start_iteration, desc=args.tag, disable=not runtime.is_main,
                    dynamic_ncols=True)
    try:
        student.train()
        while iteration < stop_at:
            if batches is None:
                epoch = iteration // iters_per_epoch
                sampler.set_epoch(epoch, iteration % iters_per_epoch)
                batches = iter(loader)
            micro_batches = [next(batches)[:2] for _ in range(args.accum_steps)]
            stats = train_step(ctx, micro_batches, iteration, total)
            window += stats
            first_bad = ~torch.isfinite(stats[:4]).all() & (bad[0] < 0)
            bad.copy_(torch.where(first_bad, torch.cat([stats.new_full((1,), iteration), stats]), bad))
            iteration += 1
            window_steps += 1
            progress.update(1)
            end_of_epoch = iteration % iters_per_epoch == 0
            if end_of_epoch:
                batches = None

            if iteration % log_every == 0 or iteration == stop_at:
                check_finite()
                mean = (window / window_steps).tolist()
                alpha_re = alpha_re_at(args, iteration - 1, total)  # of the step just done
                row = {"iteration": iteration, "epoch": round(iteration / iters_per_epoch, 3),
                       "lr": optimizer.param_groups[0]["lr"], **dict(zip(LOSS_TERMS, mean[:4])),
                       "alpha_re": alpha_re, "tasks_per_batch": mean[4], "keypoint_distance": mean[5],
                       "seconds_per_iteration": (time.time() - window_start) / window_steps}
                history.train.append(row)
                if runtime.is_main:  # the JSON history follows the log, for live monitoring
                    write_json(history.as_dict(), files.history)
                log(f"[{iteration}/{total}] epoch {row['epoch']:.2f} lr {row['lr']:.4g} loss {row['loss']:.4f} "
                    f"class {row['class_loss']:.4f} p_class {row['p_class_loss']:.4f} re {row['re_loss']:.4f} "
                    f"alpha_re {alpha_re:.3f} tasks/batch {row['tasks_per_batch']:.1f} "
                    f"kp_dist {row['keypoint_distance']:.1f}px {row['seconds_per_iteration']:.2f}s/it")
                log_scalars(writer, iteration, {f"train/{k}": v for k, v in row.items() if k != "iteration"})
                window.zero_()
                window_steps, window_start = 0, time.time()

            if end_of_epoch or iteration == stop_at:
                check_finite()
                # the bare module under DDP: ranks may run different numbers of eval batches, so no
                # collective may hide in the forward
                eval_model = student if runtime.distributed else ddp_student
                result = evaluate(eval_model, val_set, val_targets, val_ignore, args, runtime, autocast, "val")
                record = {"epoch": round(iteration / iters_per_epoch, 3), "iteration": iteration,
                          "mAP": result["mAP"], "mAP_voc": result["mAP_voc"], "num_images": result["num_images"]}
                if teacher is not None:
                    record["mAP_teacher"] = evaluate(teacher, val_set, val_targets, val_ignore, args, runtime,
                                                     autocast, "val (teacher)")["mAP"]
                improved = record["mAP"] > best_map
                best_map = max(best_map, record["mAP"])
                record["best_mAP"] = best_map
                record["ap"], record["ap_voc"] = result["ap"], result["ap_voc"]
                history.validation.append(record)
                teacher_part = f" mAP_teacher {record['mAP_teacher']:.2f}" if teacher is not None else ""
                log(f"[val] epoch {record['epoch']:.2f} iteration {iteration}: mAP {record['mAP']:.2f} "
                    f"mAP_voc {record['mAP_voc']:.2f}{teacher_part} best {best_map:.2f} "
                    f"(chance {chance:.2f}, {result['num_images']} images)")
                log_scalars(writer, iteration, {f"val/{k}": v for k, v in record.items() if k.startswith("mAP")})
                if writer is not None:
                    log_val_cams(writer, iteration, student, val_set, runtime.device)
                if runtime.is_main and improved:
                    check_weights(iteration)
                    save_checkpoint(checkpoint_state(iteration), files.checkpoint("best"))
                save_last(iteration)
            elif args.save_every and iteration % args.save_every == 0:
                save_last(iteration)

            if stop.signum and iteration < stop_at:
                save_last(iteration)
                log(f"# stopped by signal {stop.signum} at iteration {iteration}; saved {files.checkpoint('last')}; "
                    "continue with --resume")
                raise SystemExit(128 + stop.signum)
    finally:
        progress.close()  # before any error line, so that the error stays the last line
    close_writer(writer)
    if runtime.is_main:
        log(f"# done: best val mAP {best_map:.2f}; checkpoints in {files.checkpoint('best').parent}")
    if runtime.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return history.as_dict()

