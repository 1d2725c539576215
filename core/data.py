"""Training data: the dataset (VOC2012/2007, COCO 2014, list; tools/datasets.py), the deterministic batch
sampler and the loaders."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from core.runtime import Runtime, loader_workers
from tools.augment import EvalTransform, TrainTransform
from tools.datasets import dataset_images, default_splits, open_dataset, resolve_dataset
from tools.demo_formats import default_demo_root, generate_demo
from tools.errors import UserError
from tools.images import MultiLabelImages
from tools.voc import VOC_CLASSES

DEMO_DATASETS = {"voc": "voc2012", "coco": "coco2014", "list": "list"}  # --demo format -> dataset kind


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


def resolve_data_root(args: argparse.Namespace, runtime: Runtime) -> tuple[str, Path]:
    """The dataset's kind and folder (the demo set built first for --demo)."""
    if not args.demo:
        return resolve_dataset(args.data_dir, args.dataset)
    root = Path(args.data_dir) if args.data_dir else default_demo_root(args.demo)
    if runtime.is_main:
        generate_demo(args.demo, root)
    if runtime.distributed:
        dist.barrier()
    return resolve_dataset(root, args.dataset or DEMO_DATASETS[args.demo])


@dataclass
class RunData:
    """The two splits of a run, their loaders' inputs and the validation targets; built once from the
    settings, with the facts the dataset decides (its kind, split names, classes, validation resize)."""

    root: Path
    train_set: MultiLabelImages
    val_set: MultiLabelImages
    val_targets: np.ndarray  # (N, C) 0/1
    val_ignore: np.ndarray  # (N, C) True where an image holds only difficult objects of a class
    val_boxes: list[np.ndarray] | None  # VOC: per image (M, 5) rows (class, xmin, ymin, xmax, ymax), 1-based inclusive
    sampler: EpochBatchSampler
    loader: DataLoader
    class_names: tuple[str, ...] = VOC_CLASSES
    notes: list[str] = field(default_factory=list)  # facts for the log (e.g. COCO images left out)
    val_names: list[str] = field(default_factory=list)  # per validation image: its id (VOC) or file name
    facts: dict = field(default_factory=dict)  # the settings the dataset resolves: dataset, splits, eval_resize

    def resolved_settings(self) -> dict:
        """What the run records beside its flags: the flags' resolved values, then the dataset's classes."""
        return {**self.facts, "num_classes": len(self.class_names), "class_names": list(self.class_names)}


def build_data(args: argparse.Namespace, runtime: Runtime) -> RunData:
    """Datasets, sampler and loader; every input problem is reported here, before anything is written."""
    dataset, root = resolve_data_root(args, runtime)
    default_train, default_val = default_splits(dataset)
    train_name, val_name = args.train_split or default_train, args.val_split or default_val
    train_split, val_split = (open_dataset(dataset, root, name, keep_unlabelled=args.keep_unlabelled)
                              for name in (train_name, val_name))
    if train_split.class_names != val_split.class_names:
        raise UserError(f"splits '{train_name}' and '{val_name}' of {root} list different classes "
                        f"({train_split.num_classes} and {val_split.num_classes}); use the same category list")
    eval_resize = args.eval_resize
    if eval_resize == "auto":  # VOC keeps the reference protocol; COCO's images exceed 448 px
        eval_resize = "none" if dataset.startswith("voc") else "fit"
    facts = {"dataset": dataset, "train_split": train_name, "val_split": val_name, "eval_resize": eval_resize}
    # packed: workers crop and pad in uint8, the step normalises on the device (core/step.py, device_images)
    transform = TrainTransform(args.image_size, args.min_image_size, args.max_image_size, augment=args.augment,
                               packed=True)
    train_set = dataset_images(train_split, transform, args.skip_bad_images)
    val_set = dataset_images(val_split, EvalTransform(args.image_size, eval_resize == "fit"),
                             args.skip_bad_images)
    sampler = EpochBatchSampler(len(train_set), args.batch_size, args.seed, runtime.rank, runtime.world_size,
                                args.accum_steps)
    if sampler.iterations_per_epoch < 1:
        raise UserError(f"split '{train_name}' has {len(train_set)} images, fewer than --batch_size "
                        f"{args.batch_size}; lower --batch_size")
    workers = loader_workers(args.num_workers)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=workers,
                        pin_memory=runtime.device.type == "cuda", persistent_workers=workers > 0)
    return RunData(root, train_set, val_set, val_split.labels, val_split.ignore, val_split.boxes, sampler, loader,
                   train_split.class_names, train_split.notes + val_split.notes, list(val_split.names), facts)
