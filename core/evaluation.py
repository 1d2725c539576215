"""Validation during training: scores of every image of the split, gathered over ranks, both mAPs and the
thresholded metrics (CP, CR, CF1, OP, OR, OF1, for all labels and the top 3)."""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from core.builder import make_cams
from core.localisation import flat_summary, score_localisation
from core.runtime import Runtime, loader_workers
from core.tb_logging import log_cam_images
from tools.cam_metrics import HitTally
from tools.metrics import THRESHOLD_METRICS, mean_average_precision, multilabel_metrics

THRESHOLD_KEYS = (*THRESHOLD_METRICS, *(f"{name}_top3" for name in THRESHOLD_METRICS))  # CP ... OF1_top3


@torch.no_grad()
def predict(model: nn.Module, dataset, indices: list[int], args: argparse.Namespace, runtime: Runtime,
            autocast: dict, desc: str, num_classes: int, boxes: list[np.ndarray] | None = None,
            skip: dict[str, str] | None = None) -> tuple[np.ndarray, HitTally | None]:
    """Logits of `indices` (in that order) with the evaluation transform; with `boxes` (per dataset image),
    also the pointing game and keypoint hits of the same forward's CAMs (None without), but for the
    strategies in `skip` (name -> why: plug-ins that failed before). `args`: the training settings
    (eval_batch_size, num_workers, k, min_distance, keypoint_rule)."""
    model.eval()
    batches = [indices[i:i + args.eval_batch_size] for i in range(0, len(indices), args.eval_batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=loader_workers(args.num_workers),
                        pin_memory=runtime.device.type == "cuda")
    scores, tally = [], HitTally(dropped=dict(skip or {})) if boxes is not None else None
    for images, labels, used in tqdm(loader, desc=desc, leave=False, disable=not runtime.is_main,
                                     dynamic_ncols=True):
        images = images.to(runtime.device, non_blocking=True)
        if runtime.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(**autocast):
            logits, features = model(images)
        scores.append(logits.float().cpu())
        if tally is not None:
            score_localisation(tally, make_cams(features.float()), labels.to(runtime.device),
                               [boxes[i] for i in used.tolist()], tuple(images.shape[-2:]), args.k, args.min_distance,
                               args.keypoint_rule)
    model.train()
    empty = np.zeros((0, num_classes), np.float32)
    return (torch.cat(scores).numpy() if scores else empty), tally


def evaluate(model: nn.Module, dataset, targets: np.ndarray, ignore: np.ndarray, args: argparse.Namespace,
             runtime: Runtime, autocast: dict, desc: str = "eval", boxes: list[np.ndarray] | None = None,
             skip: dict[str, str] | None = None) -> dict:
    """mAP (reference AP), mAP_voc (devkit AP) and CP ... OF1_top3 (percent, at sigmoid >= 0.5) over every
    image of the split, each counted once; with `boxes`, also "localisation": the pointing game and keypoint
    hit rates (core/localisation.py), and "skipped_strategies": `skip` and the plug-ins whose keypoints
    failed now ({name: why})."""
    n = len(dataset)
    shard = list(range(runtime.rank, n, runtime.world_size))
    scores, tally = predict(model, dataset, shard, args, runtime, autocast, desc, targets.shape[1], boxes, skip)
    if runtime.distributed:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, (shard, scores, tally))
        full = np.zeros((n, targets.shape[1]), np.float32)
        seen = np.zeros(n, np.int64)
        tally = HitTally(dropped=dict(skip or {})) if boxes is not None else None
        for idx, part, part_tally in gathered:
            full[idx] = part
            seen[idx] += 1
            if tally is not None:
                tally.merge(part_tally)
        assert (seen == 1).all(), "every validation image must be scored exactly once"
        scores = full
    m_ref, ap_ref = mean_average_precision(scores, targets, kind="reference")
    m_voc, ap_voc = mean_average_precision(scores, targets, ignore=ignore, kind="voc")
    probabilities = torch.sigmoid(torch.from_numpy(scores).double()).numpy()
    # the reference's eval_class_loss: the class loss of the validation images (a mean over images here;
    # the reference averaged equal-sized batch means, the same value without its dropped last batch)
    class_loss = F.multilabel_soft_margin_loss(torch.from_numpy(scores).double(), torch.from_numpy(targets).double())
    result = {"mAP": m_ref, "mAP_voc": m_voc, **multilabel_metrics(probabilities, targets, ignore),
              "eval_class_loss": float(class_loss), "ap": ap_ref.tolist(), "ap_voc": ap_voc.tolist(), "num_images": n,
              "scores": scores}
    if tally is not None:
        result["localisation"] = flat_summary(tally)
        result["skipped_strategies"] = dict(tally.dropped)
    return result


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
