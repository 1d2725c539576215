"""Score a run's CAMs (from make_cams.py) against the split's masks and boxes: is the CAM on the object?

* mIoU of CAM masks against SegmentationClass/<id>.png (21 classes with background, 255 ignored)
  for every background threshold of a sweep: a pixel takes the class of its highest CAM, or
  background when no CAM is above the threshold. Prints the mIoU per threshold, the best one and
  the per-class IoU table there. The threshold is selected on the same images it is scored on,
  as the weakly-supervised segmentation literature does (Puzzle-CAM's evaluate.py included).
* Pointing game: the fraction of (image, positive class) pairs whose CAM maximum lies in a box
  of that class. Keypoint hit rate: for every registered strategy that cuts at a CAM keypoint
  (core.localisation.keypoint_strategies(), plug-ins included), the fraction of its keypoints (the
  training loop's build_tasks on these CAMs) inside a box of their class (any of the image's classes
  for an image-level strategy such as Max), and their mean distance to the nearest such box. A plug-in
  whose keypoint function fails is left out with one warning.

    python evaluate_cams.py --tag T [--checkpoint best|last|PATH] [--teacher] [--split val] [--cam_dir DIR]
        [--thresholds 0.05:0.60:0.05] [--save_pseudo_labels DIR] [--k K --min_distance D]

Writes OUTPUT_DIR/data/<tag>_eval_cams_<split>[_teacher].json.
"""
from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.config import OneLineParser
from core.inspection import read_checkpoint
from core.localisation import POINTING_GAME, display_names, keypoint_strategies, score_localisation
from tools.cam_files import cam_file, ids_sha256, load_cams, provenance_mismatch, read_metadata
from tools.cam_metrics import (
    NUM_SEG_CLASSES,
    HitTally,
    box_array,
    foreground,
    iou_per_class,
    label_mask,
    mean_iou,
    palette_image,
    threshold_confusions,
)
from tools.errors import UserError, run_cli
from tools.run_files import cam_folder, resolve_checkpoint, safe_name
from tools.run_inputs import add_run_args, data_root, default_split, make_folder
from tools.voc import VOC_CLASSES, Annotation, VOCSplit, load_split

DEFAULT_THRESHOLDS = "0.05:0.60:0.05"
SEG_CLASSES = ("background", *VOC_CLASSES)
SELECTION_NOTE = "selected on the images it scores, as is usual for CAM mIoU: an optimistic figure"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p)
    p.add_argument("--teacher", action="store_true", help="the EMA teacher's CAMs (make_cams.py --teacher)")
    p.add_argument("--data_dir", default=None, help="VOC folder (default: the run's own; the demo set for --demo)")
    p.add_argument("--split", default=None, help="a split with SegmentationClass masks (default: the run's "
                   "--val_split)")
    p.add_argument("--cam_dir", default=None, help="CAM folder (default: OUTPUT_DIR/cams/<tag>_<split>[_teacher])")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS,
                   help="background thresholds: START:STOP:STEP (STOP included) or a comma-separated list")
    p.add_argument("--save_pseudo_labels", default=None, metavar="DIR",
                   help="write the masks at the best threshold as VOC palette PNGs (DIR/<id>.png)")
    p.add_argument("--k", type=int, default=None, help="peaks per class for cTopk(-w) (default: the run's)")
    p.add_argument("--min_distance", type=int, default=None, help="peak suppression radius (default: the run's)")
    return p


def parse_thresholds(text: str) -> tuple[float, ...]:
    """Sorted distinct thresholds from 'START:STOP:STEP' (STOP included) or 'a,b,c'."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not step > 0 or not math.isfinite(stop - start) or stop < start:
                raise ValueError
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--thresholds {text!r}: expected START:STOP:STEP with STOP >= START and STEP > 0, "
                        "or comma-separated numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UserError(f"--thresholds {text!r}: expected finite numbers")
    by_float32 = {float(np.float32(v)): v for v in sorted(values, reverse=True)}  # CAMs compare in float32
    return tuple(sorted(by_float32.values()))


# ----------------------------------------------------------------------------- inputs
def _header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from an image file's header, without decoding it."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"{path.parent.name}/{path.name} is not a readable image ({exc})") from None


def check_masks(root: Path, split: VOCSplit) -> None:
    """Every id of the split needs SegmentationClass/<id>.png, a label PNG of its image's size (headers only)."""
    folder = root / "SegmentationClass"
    hint = "use a split of the segmentation lists (val or train: data/val.txt, data/train.txt)"
    if not folder.is_dir():
        raise UserError(f"split {split.name!r} has no segmentation masks: {folder} does not exist; {hint}")
    missing = [i for i in split.ids if not (folder / f"{i}.png").is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserError(f"split {split.name!r} has no segmentation masks for {len(missing)} of {len(split.ids)} "
                        f"images (no SegmentationClass/<id>.png: {shown}); {hint}")
    for image_id in split.ids:
        mode, size = _header(folder / f"{image_id}.png")
        if mode not in ("P", "L"):
            raise UserError(f"SegmentationClass/{image_id}.png is a {mode} image; expected VOC's palette (mode P) "
                            "or a grey-level label PNG")
        _, image_size = _header(root / "JPEGImages" / f"{image_id}.jpg")
        if size != image_size:
            raise UserError(f"SegmentationClass/{image_id}.png is {size[0]}x{size[1]} but its image "
                            f"JPEGImages/{image_id}.jpg is {image_size[0]}x{image_size[1]}; a mask must match it")


def load_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W) labels of a SegmentationClass PNG (checked by check_masks), against the CAMs' (H, W)."""
    try:
        with Image.open(path) as image:
            mask = np.array(image)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"SegmentationClass/{path.name} is not a readable PNG ({exc})") from None
    if mask.shape != size:
        raise UserError(f"the CAMs of {path.stem} are {size[1]}x{size[0]} but SegmentationClass/{path.name} is "
                        f"{mask.shape[1]}x{mask.shape[0]}; remake the CAMs with make_cams.py --overwrite")
    return mask


def compact_boxes(annotation: Annotation, classes: np.ndarray) -> np.ndarray:
    """The image's boxes of `classes`, their class column replaced by the position in `classes` (the CAM channel)."""
    boxes = box_array(annotation.objects)
    position = {int(c): i for i, c in enumerate(classes)}
    keep = np.array([int(c) in position for c in boxes[:, 0]], bool)
    boxes = boxes[keep]
    boxes[:, 0] = [position[int(c)] for c in boxes[:, 0]]
    return boxes


def locate_cams(args: argparse.Namespace, expected: dict, split_name: str) -> Path:
    """The CAM folder, checked to come from this checkpoint and split (its recorded metadata)."""
    folder = Path(args.cam_dir) if args.cam_dir else cam_folder(args.output_dir, expected["tag"], split_name,
                                                                 args.teacher)
    metadata = read_metadata(folder)
    again = (f"python make_cams.py --tag {expected['tag']} --checkpoint {args.checkpoint} --split {split_name}"
             f"{' --teacher' if args.teacher else ''}")
    if metadata is None:
        raise UserError(f"no CAMs at {folder} (no cams.json); make them first: {again}")
    mismatch = provenance_mismatch(metadata, expected)
    if mismatch:
        raise UserError(f"the CAMs in {folder} do not belong here: {mismatch}; remake them ({again} --overwrite) "
                        "or pass the matching --checkpoint/--split/--cam_dir")
    return folder


@dataclass
class Inputs:
    """What a run, its split and its CAM folder say, checked against each other."""

    tag: str
    checkpoint: Path
    root: Path
    split: VOCSplit
    folder: Path
    expected: dict  # the provenance the CAM folder must carry
    k: int
    min_distance: int
    keypoint_rule: str  # the run's (core/keypoints.py: reference or clean)


def resolve_inputs(args: argparse.Namespace) -> Inputs:
    path = resolve_checkpoint(args.tag, args.checkpoint, args.output_dir)
    checkpoint, sha = read_checkpoint(path)
    config = dict(checkpoint["config"])
    tag = args.tag or config.get("tag") or path.stem
    k = config.get("k", 5) if args.k is None else args.k
    min_distance = config.get("min_distance", 20) if args.min_distance is None else args.min_distance
    if k < 1 or min_distance < 0:
        raise UserError("--k must be at least 1 and --min_distance not negative")
    split_name = args.split or default_split(config)
    root = data_root(config, args.data_dir)
    split = load_split(root, split_name)
    check_masks(root, split)
    expected = {"tag": tag, "checkpoint": str(path), "checkpoint_sha256": sha,
                "network": "teacher" if args.teacher else "student", "split": split_name,
                "split_ids_sha256": ids_sha256(split.ids), "script": checkpoint.get("script"), "config": config}
    folder = locate_cams(args, expected, split_name)
    missing = [i for i in split.ids if not cam_file(folder, i).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of {len(split.ids)} images have no CAM file in {folder} (e.g. {missing[0]}); "
                        "finish them with make_cams.py --resume")
    return Inputs(tag, path, root, split, folder, expected, k, min_distance, config.get("keypoint_rule", "reference"))


# ----------------------------------------------------------------------------- scoring
def score_split(inputs: Inputs, thresholds: tuple[float, ...]) -> tuple[np.ndarray, HitTally]:
    """Confusion matrices (T, 21, 21) at every threshold and the localisation tally, over the split."""
    confusions = np.zeros((len(thresholds), NUM_SEG_CLASSES, NUM_SEG_CLASSES), np.int64)
    tally = HitTally()
    pairs = list(zip(inputs.split.ids, inputs.split.annotations))
    for image_id, annotation in tqdm(pairs, desc="scoring", leave=False, dynamic_ncols=True):
        classes, cams = load_cams(cam_file(inputs.folder, image_id))
        mask_path = inputs.root / "SegmentationClass" / f"{image_id}.png"
        truth = load_mask(mask_path, cams.shape[1:])
        value, labels = foreground(cams, classes)
        try:
            confusions += threshold_confusions(value, labels, truth, thresholds)
        except ValueError as exc:
            raise UserError(f"SegmentationClass/{mask_path.name}: {exc}") from None
        if len(classes):  # the keypoints of the training loop's rules, on these CAMs at the image's size
            score_localisation(tally, torch.from_numpy(cams)[None], torch.ones(1, len(classes)),
                               [compact_boxes(annotation, classes)], tuple(cams.shape[1:]), inputs.k,
                               inputs.min_distance, inputs.keypoint_rule)
    return confusions, tally


def write_pseudo_labels(folder: Path, ids: list[str], threshold: float, out: Path) -> int:
    out = make_folder(out)
    for image_id in tqdm(ids, desc="pseudo labels", leave=False, dynamic_ncols=True):
        classes, cams = load_cams(cam_file(folder, image_id))
        try:
            palette_image(label_mask(cams, classes, threshold)).save(out / f"{safe_name(image_id)}.png")
        except OSError as exc:
            raise UserError(f"cannot write {out / image_id}.png ({exc.strerror or exc}); choose another "
                            "--save_pseudo_labels folder") from None
    return len(ids)


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * float(value)


def summarise(confusions: np.ndarray, thresholds: tuple[float, ...], tally: HitTally) -> dict:
    mious = [mean_iou(c) for c in confusions]
    best = int(np.nanargmax(mious)) if np.isfinite(mious).any() else 0  # first of equal maxima
    ious = iou_per_class(confusions[best])
    return {"thresholds": [{"threshold": t, "mIoU": _percent(m)} for t, m in zip(thresholds, mious)],
            "best_threshold": thresholds[best], "best_mIoU": _percent(mious[best]),
            "classes": [{"class": name, "IoU": _percent(iou)} for name, iou in zip(SEG_CLASSES, ious)],
            "localisation": tally.summary(), "note": SELECTION_NOTE}


def format_report(result: dict) -> str:
    def cell(value: float | None, digits: int = 2) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    lines = [f"threshold {row['threshold']:.2f}: mIoU {cell(row['mIoU'])}" for row in result["thresholds"]]
    lines.append(f"best threshold {result['best_threshold']:.2f}: mIoU {cell(result['best_mIoU'])} ({result['note']})")
    lines.append(f"{'class':<12} {'IoU':>7}")
    lines += [f"{row['class']:<12} {cell(row['IoU']):>7}" for row in result["classes"]]
    lines.append(f"{'points':<14} {'hit rate':>8} {'distance px':>11} {'count':>6}")
    names = display_names()
    for name in (POINTING_GAME, *keypoint_strategies()):
        row = result["localisation"].get(name, {"hit_rate": float("nan"), "count": 0})
        lines.append(f"{names[name]:<14} {cell(row['hit_rate']):>8} {cell(row.get('distance'), 1):>11} "
                     f"{row['count']:>6}")
    lines.append("hit rate: % of points inside a box of their class (Max: of any of the image's classes); distance: "
                 "mean pixel distance to the nearest such box (0 inside); pointing game: the CAM's maximum")
    return "\n".join(lines)


def result_path(output_dir: str, tag: str, split: str, teacher: bool) -> Path:
    return Path(output_dir) / "data" / f"{tag}_eval_cams_{safe_name(split)}{'_teacher' if teacher else ''}.json"


def evaluate_cams(args: argparse.Namespace) -> dict:
    thresholds = parse_thresholds(args.thresholds)
    inputs = resolve_inputs(args)
    split = inputs.split
    confusions, tally = score_split(inputs, thresholds)
    for reason in tally.dropped.values():  # a broken plug-in: the other strategies' scores stand
        warnings.warn(f"{reason}; its hit rate is left out", stacklevel=2)
    result = summarise(confusions, thresholds, tally)
    result |= {**inputs.expected, "cam_dir": str(inputs.folder), "scales": read_metadata(inputs.folder).get("scales"),
               "k": inputs.k, "min_distance": inputs.min_distance, "keypoint_rule": inputs.keypoint_rule,
               "num_images": len(split.ids),
               "data_root": str(inputs.root)}
    print(f"# checkpoint {inputs.checkpoint} sha256 {result['checkpoint_sha256']} ({result['network']})")
    print(f"{inputs.tag}: CAMs of {split.name} ({len(split.ids)} images) in {inputs.folder}, scales "
          f"{result['scales']}")
    print(format_report(result))
    if args.save_pseudo_labels:
        count = write_pseudo_labels(inputs.folder, split.ids, result["best_threshold"], Path(args.save_pseudo_labels))
        print(f"wrote {count} pseudo labels (threshold {result['best_threshold']:.2f}) to {args.save_pseudo_labels}")
    out = result_path(args.output_dir, inputs.tag, split.name, args.teacher)
    make_folder(out.parent)
    try:
        out.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); use --output_dir DIR") from None
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: evaluate_cams(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
