"""Evaluate a trained run on a labelled split: per-class AP of both kinds, the mAPs and CP/CR/CF1/OP/OR/OF1
(all labels and top 3, at sigmoid >= 0.5), optionally multi-scale.

The images follow the training loop's evaluation protocol (normalise, keep the top-left
image_size x image_size window, zero-padded): scale 1.0 without --flip gives exactly the mAP the
training loop logged for the same checkpoint. Other scales resize that padded batch bilinearly to
image_size * scale (rounded to a multiple of 16); the logits of all scales (and flips) are averaged.

    python evaluate_classification.py --tag T [--checkpoint best|last|PATH] [--teacher] [--split val]
        [--scales 1.0,0.5,1.5] [--flip]

Writes OUTPUT_DIR/data/<tag>_eval_<split>[_teacher].csv and .json; the JSON also holds the checkpoint's
SHA-256 and the config it was trained with (printed first).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from core.builder import OUTPUT_STRIDE
from core.config import OneLineParser
from core.inspection import LoadedRun, describe_provenance, load_run
from core.runtime import AMP_DTYPES, autocast_settings, choose_device, loader_workers
from tools.augment import EvalTransform
from tools.datasets import dataset_images
from tools.errors import UserError, run_cli
from tools.images import MultiLabelImages
from tools.metrics import THRESHOLD_METRICS, mean_average_precision, multilabel_metrics
from tools.run_files import safe_name
from tools.run_inputs import add_run_args, make_folder, open_run_split
from tools.voc import VOC_CLASSES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_args(p)
    p.add_argument("--teacher", action="store_true", help="evaluate the EMA teacher instead of the student")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the run's own; the demo set for --demo)")
    p.add_argument("--split", default=None, help="a labelled split (default: the run's --val_split)")
    p.add_argument("--scales", default="1.0", help="comma-separated input scales, e.g. 1.0,0.5,1.5")
    p.add_argument("--flip", action="store_true", help="also average the logits of the flipped images")
    p.add_argument("--batch_size", type=int, default=None, help="default: the run's eval batch size")
    p.add_argument("--num_workers", type=int, default=None, help="default: the run's --num_workers")
    p.add_argument("--amp", default="run", choices=["run", *AMP_DTYPES],
                   help="autocast as in the run's evaluation (run), or off/bf16/fp16")
    return p


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers such as 1.0,0.5,1.5") from None
    if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
        raise UserError(f"--scales {text!r}: every scale must be a positive number")
    return scales


def scaled_size(image_size: int, scale: float) -> int:
    """image_size * scale rounded to a multiple of the output stride (at least one feature cell)."""
    return max(OUTPUT_STRIDE, round(image_size * scale / OUTPUT_STRIDE) * OUTPUT_STRIDE)


def run_autocast(amp: str, config: dict, device: torch.device) -> dict:
    """torch.autocast kwargs; 'run' follows the run's --amp, except fp16 off CUDA (the trainer refuses it too)."""
    if amp == "run":
        amp = config.get("amp", "off")
        if amp == "fp16" and device.type != "cuda":
            amp = "off"
    elif amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    return autocast_settings(device, amp)


@torch.no_grad()
def multiscale_logits(model: torch.nn.Module, images: torch.Tensor, scales: tuple[float, ...], flip: bool,
                      autocast: dict) -> torch.Tensor:
    """Mean of the logits over every scale (and its flip) of a padded batch (B, 3, S, S)."""
    size = images.shape[-1]
    total, count = None, 0
    for scale in scales:
        target = scaled_size(size, scale)
        batch = images if target == size else F.interpolate(images, size=(target, target), mode="bilinear",
                                                             align_corners=False)
        for view in (batch, batch.flip(-1)) if flip else (batch,):
            with torch.autocast(**autocast):
                logits = model(view)[0].float()
            total = logits if total is None else total + logits
            count += 1
    return total / count  # x / 1 is exact: one view gives the training loop's numbers bit for bit


def predict_split(run: LoadedRun, dataset: MultiLabelImages, args: argparse.Namespace, device: torch.device,
                  autocast: dict) -> np.ndarray:
    """(n, C) averaged logits in the split's order."""
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    model = run.model
    if device.type == "cuda":  # the training loop evaluates channels_last on CUDA
        model = model.to(memory_format=torch.channels_last)
    scores = []
    for images, _, _ in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        scores.append(multiscale_logits(model, images, args.scales, args.flip, autocast).cpu())
    return torch.cat(scores).numpy()


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else 100.0 * float(value)


def ap_results(scores: np.ndarray, targets: np.ndarray, ignore: np.ndarray,
               class_names: tuple[str, ...] = VOC_CLASSES) -> dict:
    """Both mAPs, CP ... OF1_top3 (percent) and a per-class table; AP values in percent, None for a class
    without positives."""
    m_ref, ap_ref = mean_average_precision(scores, targets, kind="reference")
    m_voc, ap_voc = mean_average_precision(scores, targets, ignore=ignore, kind="voc")
    probabilities = torch.sigmoid(torch.from_numpy(scores).double()).numpy()  # as the training loop does
    classes = [{"class": name, "AP": _percent(ap_ref[c]), "AP_voc": _percent(ap_voc[c]),
                "positives": int(targets[:, c].sum()), "difficult_only": int(ignore[:, c].sum())}
               for c, name in enumerate(class_names)]
    return {"mAP": m_ref, "mAP_voc": m_voc, **multilabel_metrics(probabilities, targets, ignore), "classes": classes}


def format_table(result: dict) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"

    width = max(12, *(len(row["class"]) for row in result["classes"]))
    lines = [f"{'class':<{width}} {'AP':>7} {'AP_voc':>7} {'positives':>9}"]
    lines += [f"{row['class']:<{width}} {cell(row['AP']):>7} {cell(row['AP_voc']):>7} {row['positives']:>9}"
              for row in result["classes"]]
    lines.append(f"{'mAP':<{width}} {cell(result['mAP']):>7} {cell(result['mAP_voc']):>7}")
    lines.append("AP: reference kind (mean precision at each positive's rank); AP_voc: VOC2012 devkit kind "
                 "(area under the precision envelope, images whose objects of the class are all difficult ignored)")
    lines.append(f"{'':<8}" + "".join(f"{name:>7}" for name in THRESHOLD_METRICS))
    for label, suffix in (("all", ""), ("top-3", "_top3")):
        lines.append(f"{label:<8}" + "".join(f"{cell(result[name + suffix]):>7}" for name in THRESHOLD_METRICS))
    lines.append("CP/CR: per-class precision/recall averaged over the classes; OP/OR: over all labels; CF1/OF1 "
                 "from them; a label is predicted at sigmoid >= 0.5 (top-3: and among the image's 3 highest)")
    return "\n".join(lines)


def output_paths(output_dir: str, tag: str, split: str, teacher: bool) -> tuple[Path, Path]:
    stem = f"{tag}_eval_{safe_name(split)}{'_teacher' if teacher else ''}"
    folder = Path(output_dir) / "data"
    return folder / f"{stem}.csv", folder / f"{stem}.json"


def write_results(result: dict, csv_path: Path, json_path: Path) -> None:
    make_folder(csv_path.parent)
    try:
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "AP", "AP_voc", "positives", "difficult_only"])
            for row in result["classes"]:
                writer.writerow([row["class"], "" if row["AP"] is None else row["AP"],
                                 "" if row["AP_voc"] is None else row["AP_voc"], row["positives"],
                                 row["difficult_only"]])
            writer.writerow(["mAP", result["mAP"], result["mAP_voc"], "", ""])
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the results to {csv_path.parent} ({exc.strerror or exc}); "
                        "use --output_dir DIR") from None


def evaluate(args: argparse.Namespace) -> dict:
    args.scales = parse_scales(args.scales)
    device = choose_device(args.device)
    run = load_run(args.tag, args.checkpoint, args.output_dir, device, teacher=args.teacher)
    print("\n".join(describe_provenance(run)), flush=True)
    config = run.config
    if args.batch_size is None:  # the run's own batches: identical numbers to its logged evaluation
        args.batch_size = config.get("eval_batch_size") or config.get("batch_size") or 32
    # a run's "auto" is sized for this machine
    args.num_workers = loader_workers(config.get("num_workers", 0)) if args.num_workers is None else args.num_workers
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--batch_size must be at least 1 and --num_workers not negative")
    split = open_run_split(config, args.data_dir, args.split)  # refuses a split without annotations (VOC2012 test)
    split_name, root = split.split, split.root
    dataset = dataset_images(split, EvalTransform(config["image_size"], config.get("eval_resize") == "fit"))
    autocast = run_autocast(args.amp, config, device)
    scores = predict_split(run, dataset, args, device, autocast)
    result = ap_results(scores, split.labels, split.ignore, split.class_names)
    result |= {"tag": run.tag, "checkpoint": str(run.path), "network": run.network, "epoch": run.epoch,
               "iteration": run.iteration, "dataset": split.kind, "data_root": str(root), "split": split_name,
               "num_images": len(split.names),
               "image_size": config["image_size"], "scales": list(args.scales), "flip": args.flip,
               "amp": str(autocast["dtype"]).removeprefix("torch.") if autocast["enabled"] else "off",
               **run.provenance()}
    csv_path, json_path = output_paths(args.output_dir, run.tag, split_name, args.teacher)
    write_results(result, csv_path, json_path)
    print(f"{run.tag} ({run.network}, {run.path}, iteration {run.iteration}) on {split_name}: {len(split.names)} "
          f"images, scales {','.join(f'{s:g}' for s in args.scales)}{', flip' if args.flip else ''}")
    print(format_table(result))
    print(f"wrote {csv_path} and {json_path}")
    return result


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda: evaluate(build_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
