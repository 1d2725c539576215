"""Predict the labels of image files with a trained run (the classes of the run's dataset).

    python infer.py IMAGE [IMAGE ...] (--tag T [--checkpoint best|last] | --checkpoint PATH)
        [--threshold 0.5] [--save_cam DIR] [--device auto]

Prints two '# ' lines (the checkpoint's SHA-256, the recipe it was trained with), then one line per
image. With --save_cam, DIR/predictions.json holds the predictions with the checkpoint's hash and config.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from core.config import OneLineParser
from core.inspection import cam_overlay, denormalize, describe_provenance, load_run, predict_with_cams
from core.runtime import choose_device
from tools.errors import UserError, run_cli
from tools.run_files import safe_name
from tools.run_inputs import (
    add_run_args,
    eval_input,
    make_folder,
    open_image,
    resize_long_side,
    run_class_names,
    save_png,
)
from tools.voc import VOC_CLASSES

PROTOCOL = ("Each image is resized so that its long side is the run's --image_size (bicubic), then normalised and "
            "zero-padded at the bottom/right to image_size x image_size (the evaluation's top-left padding).")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=f"{__doc__.splitlines()[0]} {PROTOCOL}",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    add_run_args(p)
    p.add_argument("--threshold", type=float, default=0.5, help="print the labels whose sigmoid score is above this")
    p.add_argument("--save_cam", default=None, metavar="DIR", help="write CAM overlays of the predicted classes here")
    return p


def predicted_labels(probs: torch.Tensor, threshold: float,
                     class_names: tuple[str, ...] = VOC_CLASSES) -> list[tuple[str, float]]:
    """(class, score) above the threshold, highest score first."""
    picked = [(class_names[c], float(probs[c])) for c in range(len(class_names)) if probs[c] > threshold]
    return sorted(picked, key=lambda pair: -pair[1])


def format_prediction(path: str, labels: list[tuple[str, float]], probs: torch.Tensor, threshold: float,
                      class_names: tuple[str, ...] = VOC_CLASSES) -> str:
    if labels:
        return f"{path}: " + ", ".join(f"{name} {score:.4f}" for name, score in labels)
    best = int(probs.argmax())
    return f"{path}: (no label above {threshold:g}; best {class_names[best]} {float(probs[best]):.4f})"


def save_cams(folder: Path, stem: str, rgb: np.ndarray, cams: torch.Tensor, labels: list[tuple[str, float]],
              visible: tuple[int, int], class_names: tuple[str, ...] = VOC_CLASSES) -> list[Path]:
    """One overlay PNG per predicted class, cropped to the image (without the padding)."""
    height, width = visible
    paths = []
    for name, _ in labels:
        overlay = cam_overlay(rgb, cams[class_names.index(name)])[:height, :width]
        paths.append(save_png(folder / f"{stem}_{safe_name(name)}.png", overlay))
    return paths


def write_predictions(path: Path, provenance: dict, results: list, threshold: float) -> None:
    """The labels of every image beside the checkpoint that produced them (its hash and config)."""
    images = [{"image": str(image), "labels": [{"class": name, "score": score} for name, score in labels]}
              for image, labels in results]
    try:
        path.write_text(json.dumps({**provenance, "threshold": threshold, "images": images}, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror or exc}); choose another --save_cam folder") from None


def infer(args: argparse.Namespace) -> list[tuple[str, list[tuple[str, float]]]]:
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    images = [open_image(path) for path in args.images]  # every path checked before any output
    device = choose_device(args.device)
    run = load_run(args.tag, args.checkpoint, args.output_dir, device)
    print("\n".join(describe_provenance(run)), flush=True)
    size, class_names = run.config["image_size"], run_class_names(run.config)
    folder = make_folder(args.save_cam) if args.save_cam else None
    results, saved = [], 0
    for path, image in zip(args.images, images):
        tensor = eval_input(image, size, fit=True)
        logits, _, cams = predict_with_cams(run.model, tensor, device)
        probs = torch.sigmoid(logits)
        labels = predicted_labels(probs, args.threshold, class_names)
        print(format_prediction(path, labels, probs, args.threshold, class_names))
        results.append((path, labels))
        if folder is not None:
            fitted = resize_long_side(image, size)
            saved += len(save_cams(folder, f"{safe_name(Path(path).stem)}", denormalize(tensor), cams, labels,
                                   (fitted.height, fitted.width), class_names))
    if folder is not None:
        write_predictions(folder / "predictions.json", run.provenance(), results, args.threshold)
        print(f"wrote {saved} CAM overlay(s) and predictions.json to {folder}")
    return results


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: infer(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
