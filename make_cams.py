"""Class activation maps of a trained run for every image of a split, multi-scale with flips.

Puzzle-CAM's inference protocol: each image is used whole, at its own size (no crop, no padding).
For every scale s it is resized to round(W*s) x round(H*s) (bicubic), normalised and run together
with its horizontal mirror; the ReLU'd class maps of both (the mirror's flipped back) are summed,
upsampled bilinearly to the image size rounded up to a multiple of 16 and cropped to the image.
The scales' maps are summed and each class's map is divided by its maximum + 1e-5. The CAMs of the
image's ground-truth classes are saved. Images of the same size are run in one batch.

    python make_cams.py --tag T [--checkpoint best|last|PATH] [--teacher] [--split val]
        [--scales 1.0,0.5,1.5,2.0] [--out DIR] [--resume | --overwrite]

Writes OUT/<id>.npz and OUT/cams.json (tools/cam_files.py); OUT defaults to
OUTPUT_DIR/cams/<tag>_<split>[_teacher]/. Then: python evaluate_cams.py --tag T [--split ...].
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from core.builder import OUTPUT_STRIDE
from core.config import OneLineParser
from core.inspection import LoadedRun, describe_provenance, load_run
from core.runtime import AMP_DTYPES, choose_device, loader_workers
from evaluate_classification import parse_scales, run_autocast
from tools.augment import normalize
from tools.cam_files import (
    METADATA_NAME,
    cam_file,
    ids_sha256,
    provenance_mismatch,
    read_metadata,
    save_cams,
    write_metadata,
)
from tools.errors import UserError, run_cli
from tools.run_files import cam_folder
from tools.run_inputs import add_run_args, data_root, default_split, make_folder
from tools.voc import BadImageError, labels_matrix, load_rgb_image, load_split

DEFAULT_SCALES = "1.0,0.5,1.5,2.0"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p)
    p.add_argument("--teacher", action="store_true", help="CAMs of the EMA teacher instead of the student")
    p.add_argument("--data_dir", default=None, help="VOC folder (default: the run's own; the demo set for --demo)")
    p.add_argument("--split", default=None, help="a labelled split (default: the run's --val_split)")
    p.add_argument("--scales", default=DEFAULT_SCALES, help="comma-separated positive input scales")
    p.add_argument("--out", default=None, help="CAM folder (default: OUTPUT_DIR/cams/<tag>_<split>[_teacher])")
    p.add_argument("--batch_size", type=int, default=4, help="images per forward (only images of equal size)")
    p.add_argument("--num_workers", type=int, default=None, help="default: the run's --num_workers")
    p.add_argument("--amp", default="run", choices=["run", *AMP_DTYPES],
                   help="autocast as in the run's evaluation (run), or off/bf16/fp16")
    p.add_argument("--resume", action="store_true", help="keep the CAM files already written (same checkpoint "
                   "and split) and make the others")
    p.add_argument("--overwrite", action="store_true", help="delete the folder's CAM files and start over")
    return p


# ----------------------------------------------------------------------------- inputs
def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) of the image at `scale`, rounded as the reference did, at least 1 pixel."""
    return max(1, round(width * scale)), max(1, round(height * scale))


class ScaledImages(Dataset):
    """(one normalised (3, h_s, w_s) tensor per scale, index) per image of a split."""

    def __init__(self, root: Path, ids: Sequence[str], scales: Sequence[float]) -> None:
        self.paths = [Path(root) / "JPEGImages" / f"{i}.jpg" for i in ids]
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image = load_rgb_image(self.paths[index])
        views = []
        for scale in self.scales:
            size = scaled_size(image.width, image.height, scale)
            resized = image if size == image.size else image.resize(size, Image.BICUBIC)
            views.append(torch.from_numpy(normalize(np.asarray(resized))))
        return views, index


def image_sizes(root: Path, ids: Sequence[str]) -> list[tuple[int, int]]:
    """(width, height) of every image, from the file headers (no decoding)."""
    sizes = []
    for image_id in ids:
        path = Path(root) / "JPEGImages" / f"{image_id}.jpg"
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except (OSError, SyntaxError, ValueError) as exc:
            raise BadImageError(f"JPEGImages/{path.name} is not a readable image ({exc})") from None
    return sizes


def same_size_batches(indices: Sequence[int], sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches of at most batch_size images of one size; sizes in order of first appearance, split order within."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index in indices:
        groups.setdefault(sizes[index], []).append(index)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


# ----------------------------------------------------------------------------- the protocol
@torch.no_grad()
def fuse_cams(model: torch.nn.Module, views: Sequence[torch.Tensor], size: tuple[int, int],
              autocast: dict) -> torch.Tensor:
    """(B, C, H, W) CAMs of a batch of images of size (H, W), given its views (B, 3, h_s, w_s), one per scale."""
    height, width = size
    padded = (math.ceil(height / OUTPUT_STRIDE) * OUTPUT_STRIDE, math.ceil(width / OUTPUT_STRIDE) * OUTPUT_STRIDE)
    total = None
    for view in views:
        count = view.shape[0]
        with torch.autocast(**autocast):
            features = model(torch.cat([view, view.flip(-1)]))[1]
        maps = F.relu(features.float())
        maps = maps[:count] + maps[count:].flip(-1)
        maps = F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)[..., :height, :width]
        total = maps if total is None else total + maps
    return total / (total.amax(dim=(2, 3), keepdim=True) + 1e-5)


# ----------------------------------------------------------------------------- the folder
def expected_metadata(run: LoadedRun, split_name: str, ids: list[str], root: Path, scales: Sequence[float]) -> dict:
    """cams.json: the run's provenance (checkpoint path and SHA-256, script, config), the split, the scales."""
    return {"tag": run.tag, **run.provenance(), "split": split_name, "split_ids_sha256": ids_sha256(ids),
            "num_images": len(ids), "data_root": str(root), "scales": list(scales), "flip": True}


def prepare_folder(folder: Path, metadata: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to mix CAMs of two checkpoints, splits or scale sets; --overwrite clears, --resume continues."""
    make_folder(folder)
    recorded = read_metadata(folder)
    existing = sorted(folder.glob("*.npz"))
    if overwrite:
        for path in existing:
            path.unlink()
        (folder / METADATA_NAME).unlink(missing_ok=True)
    elif recorded is not None or existing:
        if not resume:
            raise UserError(f"{folder} already holds CAMs ({len(existing)} files); pass --resume to finish them "
                            "or --overwrite to start over, or choose another --out")
        if recorded is None:
            raise UserError(f"--resume: {folder} has CAM files but no {METADATA_NAME} saying where they came from; "
                            "pass --overwrite or another --out")
        mismatch = provenance_mismatch(recorded, metadata)
        if mismatch is None and list(recorded.get("scales", [])) != list(metadata["scales"]):
            mismatch = f"they were made at scales {recorded.get('scales')}, not {metadata['scales']}"
        if mismatch:
            raise UserError(f"--resume: the CAMs in {folder} do not fit: {mismatch}; pass --overwrite or another --out")
    write_metadata(folder, metadata)


def make_split_cams(args: argparse.Namespace) -> Path:
    scales = parse_scales(args.scales)
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        raise UserError("--batch_size must be at least 1 and --num_workers not negative")
    if args.resume and args.overwrite:
        raise UserError("--resume and --overwrite exclude each other; pick one")
    device = choose_device(args.device)
    run = load_run(args.tag, args.checkpoint, args.output_dir, device, teacher=args.teacher)
    split_name = args.split or default_split(run.config)
    root = data_root(run.config, args.data_dir)
    split = load_split(root, split_name)  # labelled: the positive classes select the CAMs
    labels = labels_matrix(split)
    folder = Path(args.out) if args.out else cam_folder(args.output_dir, run.tag, split_name, args.teacher)
    metadata = expected_metadata(run, split_name, split.ids, root, scales)
    prepare_folder(folder, metadata, args.resume, args.overwrite)
    todo = [i for i, image_id in enumerate(split.ids) if not cam_file(folder, image_id).exists()]
    sizes = image_sizes(root, split.ids)
    batches = same_size_batches(todo, sizes, args.batch_size)
    workers = loader_workers(run.config.get("num_workers", 0)) if args.num_workers is None else args.num_workers
    loader = DataLoader(ScaledImages(root, split.ids, scales), batch_sampler=batches, num_workers=workers,
                        pin_memory=device.type == "cuda")
    autocast = run_autocast(args.amp, run.config, device)
    print("\n".join(describe_provenance(run)), flush=True)
    print(f"{run.tag} ({run.network}, {run.path}) on {split_name}: {len(todo)} of {len(split.ids)} images to do, "
          f"scales {','.join(f'{s:g}' for s in scales)} with flips, into {folder}")
    with tqdm(total=len(todo), desc="CAMs", leave=False, dynamic_ncols=True) as progress:
        for views, indices in loader:
            width, height = sizes[int(indices[0])]
            cams = fuse_cams(run.model, [v.to(device, non_blocking=True) for v in views], (height, width), autocast)
            for row, index in enumerate(indices.tolist()):
                classes = np.flatnonzero(labels[index])
                save_cams(cam_file(folder, split.ids[index]), classes, cams[row, classes].cpu().numpy())
            progress.update(len(indices))
    print(f"{folder} holds the CAMs of all {len(split.ids)} images; score them with evaluate_cams.py (same --tag, "
          "--checkpoint and --split)")
    return folder


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: make_split_cams(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
