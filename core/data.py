"""Training data: the dataset folder, the deterministic batch sampler and the loaders."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from core.runtime import Runtime
from tools.augment import EvalTransform, TrainTransform
from tools.cam_metrics import box_array
from tools.demo_data import default_demo_root, generate_demo_dataset
from tools.errors import UserError
from tools.voc import VOCClassification, load_split, resolve_voc_root


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


@dataclass
class RunData:
    """The two splits of a run, their loaders' inputs and the validation targets."""

    root: Path
    train_set: VOCClassification
    val_set: VOCClassification
    val_targets: np.ndarray  # (N, C) 0/1
    val_ignore: np.ndarray  # (N, C) True where an image holds only difficult objects of a class
    val_boxes: list[np.ndarray]  # per image (M, 5) rows (class, xmin, ymin, xmax, ymax), VOC 1-based inclusive
    sampler: EpochBatchSampler
    loader: DataLoader


def build_data(args: argparse.Namespace, runtime: Runtime) -> RunData:
    """Datasets, sampler and loader; every input problem is reported here, before anything is written."""
    root = resolve_data_root(args, runtime)
    train_split = load_split(root, args.train_split)
    val_split = load_split(root, args.val_split)
    transform = TrainTransform(args.image_size, args.min_image_size, args.max_image_size, augment=args.augment)
    train_set = VOCClassification(root, train_split, transform, args.skip_bad_images)
    val_set = VOCClassification(root, val_split, EvalTransform(args.image_size), args.skip_bad_images)
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, runtime.rank, runtime.world_size,
                                args.accum_steps)
    if sampler.iterations_per_epoch < 1:
        raise UserError(f"split '{args.train_split}' has {len(train_set)} images, fewer than --batch_size "
                        f"{args.batch_size}; lower --batch_size")
    workers = args.num_workers
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)
    return RunData(root, train_set, val_set, np.stack([a.labels for a in val_split.annotations]),
                   np.stack([a.difficult_only for a in val_split.annotations]),
                   [box_array(a.objects) for a in val_split.annotations], sampler, loader)
