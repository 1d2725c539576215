"""One whole training iteration against a literal, per-task re-statement of the official scripts.

The oracle follows the reference's structure: the student called once on the batch, the keypoint of
every (image, class) found by the per-map numpy/scikit-image rules of tests/keypoint_oracles.py, one
patch-network call per task on its four nearest-resized quadrants, the quadrants' maps resized and
concatenated back, the losses summed task by task, then SGD and the EMA update of the parameters.
Each call is cut into `reference_gpus` chunks as DataParallel would (tests/test_batchnorm.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from keypoint_oracles import argmax_reference, rule_a_reference, rule_b_reference
from test_batchnorm import literal_call, to_plain_batchnorm

from core.builder import parameter_groups
from core.config import parse_args
from core.runtime import Runtime
from core.step import build_step, train_step

SIZE, BATCH, CLASSES = 128, 4, 20
SCRIPTS = {name: (3.0, 0.05, 0.5) for name in ("max", "cmax", "ctopk", "ctopk_w")}  # alpha_re, schedule, alpha_p


def reference_cam(features: torch.Tensor) -> torch.Tensor:
    positive = F.relu(features)
    return F.relu(positive - 1e-5) / (positive.flatten(2).max(-1)[0][:, :, None, None] + 1e-5)


def quadrants(image: torch.Tensor, y: int, x: int) -> torch.Tensor:
    half = [SIZE // 2, SIZE // 2]
    parts = [image[:, :y, :x], image[:, :y, x:], image[:, y:, :x], image[:, y:, x:]]
    return torch.cat([F.interpolate(p[None], size=half, mode="nearest") for p in parts])


def stitch(maps: torch.Tensor, y: int, x: int) -> torch.Tensor:
    grid = SIZE // 16
    gy, gx = max(y // 16, 1), max(x // 16, 1)
    sizes = [(gy, gx), (gy, grid - gx), (grid - gy, gx), (grid - gy, grid - gx)]
    tiles = [F.interpolate(maps[i:i + 1], size=list(s), mode="nearest") for i, s in enumerate(sizes)]
    return torch.cat([torch.cat(tiles[:2], 3), torch.cat(tiles[2:], 3)], 2)


def literal_keypoint(strategy: str, cams: torch.Tensor, labels: torch.Tensor, image: int, cls: int | None,
                     min_distance: int) -> tuple[int, int]:
    if strategy == "max":
        merged = (cams[image] * labels[image][:, None, None]).max(0)[0]
        up = F.interpolate(merged[None, None], size=[SIZE, SIZE], mode="bilinear", align_corners=False)[0, 0]
        return tuple(argmax_reference(up.numpy()))
    up = F.interpolate(cams[image, cls][None, None], size=[SIZE, SIZE], mode="bilinear", align_corners=False)[0, 0]
    if strategy == "cmax":
        return tuple(argmax_reference(up.numpy()))
    if strategy == "ctopk":  # the 128-px radius at 512 px, scaled with the image
        return tuple(rule_a_reference(up.numpy(), 5, min_distance, radius=SIZE // 4))
    return tuple(rule_b_reference(up.numpy(), 5, min_distance))


def tile_maps_in_one_call(student, images, cuts, gpus):
    """--tile_calls batch: every task's quadrants in one call, ordered by quadrant (Puzzle-CAM's call)."""
    tiles = torch.stack([quadrants(images[image], y, x) for image, (y, x) in cuts])  # (T, 4, 3, h, w)
    _, maps = literal_call(student, tiles.transpose(0, 1).flatten(0, 1), gpus)
    return maps.unflatten(0, (4, len(cuts))).transpose(0, 1)  # (T, 4, C, h', w')


def literal_iteration(strategy, student, teacher, images, labels, gpus, iteration, total, args, tile_calls="task"):
    """Losses (class, p_class, re) of one reference iteration; updates student/teacher in place."""
    alpha_re_max, schedule, alpha_p = SCRIPTS[strategy]
    optimizer = torch.optim.SGD(parameter_groups(student, args.lr, args.wd), lr=args.lr, momentum=args.momentum,
                                nesterov=True)
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * (1 - iteration / total) ** 0.9
    logits, features = literal_call(student, images, gpus)
    cams = reference_cam(features.detach().float())  # the reference's keypoints work on float32 CAMs
    tasks = [(i, None) for i in range(BATCH)] if strategy == "max" else \
        [(i, c) for i in range(BATCH) for c in range(CLASSES) if labels[i, c] == 1]
    p_class, re = 0.0, 0.0
    cuts = [literal_keypoint(strategy, cams, labels, image, cls, args.min_distance) for image, cls in tasks]
    if tile_calls == "batch":
        batch_maps = tile_maps_in_one_call(student, images, [(image, cut) for (image, _), cut in zip(tasks, cuts)],
                                           gpus)
    for number, ((image, cls), (y, x)) in enumerate(zip(tasks, cuts)):
        tiles = quadrants(images[image], y, x)
        if tile_calls == "batch":
            tile_maps = batch_maps[number]
        elif strategy == "max":
            _, tile_maps = literal_call(student, tiles, gpus)
        else:
            with torch.no_grad():
                _, tile_maps = literal_call(teacher, tiles, gpus)
        rebuilt = stitch(tile_maps, y, x)
        target = labels[image] if cls is None else F.one_hot(torch.tensor(cls), CLASSES).float()
        p_class = p_class + F.multilabel_soft_margin_loss(rebuilt.mean((2, 3)), target[None])
        re = re + ((features[image] - rebuilt[0]).abs() * target[:, None, None]).mean()
    p_class, re = p_class / len(tasks), re / len(tasks)
    class_loss = F.multilabel_soft_margin_loss(logits, labels)
    alpha_re = min(alpha_re_max * iteration / (total * schedule), alpha_re_max)
    (class_loss + alpha_p * p_class + alpha_re * re).backward()
    optimizer.step()
    if teacher is not None:
        a = min(1 - 1 / (iteration + 1), 0.99)
        with torch.no_grad():
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.mul_(a).add_(s, alpha=1 - a)
    return torch.stack([class_loss.detach(), p_class.detach(), re.detach()])


@pytest.mark.parametrize("strategy,gpus,tile_calls", [
    ("ctopk_w", 1, "task"), ("ctopk_w", 4, "task"), ("max", 1, "task"), ("max", 4, "task"), ("cmax", 4, "task"),
    ("ctopk", 4, "task"),
    ("max", 2, "batch"),  # --tile_calls batch (the Max demo): all tiles in one quadrant-ordered call
])
def test_one_iteration_equals_literal_per_task_loop(strategy, gpus, tile_calls):
    alpha_re, schedule, alpha_p = SCRIPTS[strategy]
    args = parse_args({"strategy": strategy, "head": "csi"}, [
        "--data_dir", "unused", "--architecture", "resnet18", "--pretrained", "none", "--image_size", str(SIZE),
        "--batch_size", str(BATCH), "--reference_gpus", str(gpus), "--min_distance", "3",
        "--alpha_re", str(alpha_re), "--alpha_schedule_re", str(schedule), "--alpha_p", str(alpha_p),
        "--tile_calls", tile_calls])
    torch.manual_seed(0)
    ctx = build_step(args, Runtime(torch.device("cpu")))
    # float64 networks: BatchNorm over one-tile chunks is ill-conditioned enough that float32 rounding
    # alone would separate two exact implementations (the keypoints still come from float32 CAMs)
    for network in (ctx.bare_student, ctx.bare_teacher):
        if network is not None:
            network.double()
    ctx.student.train()
    student = to_plain_batchnorm(copy.deepcopy(ctx.bare_student))
    teacher = to_plain_batchnorm(copy.deepcopy(ctx.bare_teacher)) if ctx.teacher is not None else None
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen).double()
    labels = torch.zeros(BATCH, CLASSES)
    for i, classes in enumerate([(0, 5), (3,), (7, 8, 19), (12,)]):
        labels[i, list(classes)] = 1
    iteration, total = 5, 10
    stats = train_step(ctx, [(images, labels)], iteration, total)
    expected = literal_iteration(strategy, student, teacher, images, labels, gpus, iteration, total, args, tile_calls)
    torch.testing.assert_close(stats[1:4].double(), expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in ((ctx.bare_student, student), (ctx.bare_teacher, teacher)):
        if theirs is None:
            continue
        reference = theirs.state_dict()
        for key, value in ours.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5, msg=key)
