"""What the research tools read and write besides the model: their shared command-line flags, a run's
dataset and splits, user images and PNG files. Every problem a user can cause raises `UserError`, which
the scripts turn into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from tools.augment import EvalTransform, long_side_size
from tools.datasets import SplitData, dataset_family, default_splits, detect_dataset, open_dataset, resolve_dataset
from tools.demo_formats import default_demo_root, generate_demo, is_outdated_demo
from tools.errors import UserError
from tools.images import BadImageError, load_rgb_image
from tools.voc import VOC_CLASSES


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--tag / --checkpoint / --output_dir / --device, shared by the tools that load a run."""
    parser.add_argument("--tag", default=None, help="the run's --tag (optional with --checkpoint PATH: then the "
                        "checkpoint's own tag names the outputs)")
    parser.add_argument("--checkpoint", default="best",
                        help="best | last (the tag's checkpoints under OUTPUT_DIR/models) or a path to a .pth")
    parser.add_argument("--output_dir", default="experiments", help="the runs' output folder (models/, data/, ...)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def run_class_names(config: dict) -> tuple[str, ...]:
    """The classes a run was trained on (runs from before the dataset choice were VOC's 20)."""
    return tuple(config.get("class_names") or VOC_CLASSES)



def run_dataset(config: dict, data_dir: str | None) -> tuple[str, Path]:
    """(kind, folder) to read: --data_dir when given (its layout decides), else the run's own dataset (the demo
    cache for --demo runs, rebuilt if deleted)."""
    kind = config.get("dataset")
    if data_dir is not None:  # the run's kind where the layout allows it (a VOC2007 run reads VOC2007 splits)
        detected = detect_dataset(data_dir)
        same_family = kind is not None and dataset_family(kind) == dataset_family(detected[0])
        return resolve_dataset(data_dir, kind) if same_family else detected
    if config.get("demo"):
        demo = config["demo"]
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
