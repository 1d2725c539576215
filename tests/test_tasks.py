"""The batched puzzle tasks against a slow per-task loop written independently here."""
import keypoint_oracles as oracles
import pytest
import torch
import torch.nn.functional as F

from core.builder import Classifier, make_cams
from core.keypoints import upsample_maps
from core.puzzle import grid_cuts_from_pixel_cuts, split_at_keypoints, stitch_tiles
from core.step import puzzle_losses
from core.strategies import STRATEGIES, build_tasks


def oracle_cut(strategy, cam_map, height, width, k, r, keypoint_rule="reference"):
    """The strategy's cut for one (merged or per-class) h x w map, from the literal per-map rules."""
    if strategy.name == "puzzle":
        return [height // 2, width // 2]
    cam = upsample_maps(cam_map[None], (height, width))[0].numpy()
    reference = keypoint_rule == "reference"
    if strategy.name in ("max", "cmax"):
        return oracles.argmax_reference(cam) if reference else oracles.argmax_clean(cam)
    if strategy.name == "ctopk":
        return oracles.rule_a_reference(cam, k, r) if reference else oracles.rule_a_clean(cam, k, r)
    return oracles.rule_b_reference(cam, k, r) if reference else oracles.rule_b_clean(cam, k, r)


def one_task_loop(image, features, cam_map, target, network, strategy, k, r):
    """One task, the plain way: detect, crop with slices, interpolate, forward, interpolate, concatenate."""
    _, height, width = image.shape
    y, x = oracle_cut(strategy, cam_map, height, width, k, r)
    crops = [image[:, :y, :x], image[:, :y, x:], image[:, y:, :x], image[:, y:, x:]]
    tiles = torch.cat([F.interpolate(c[None], size=(height // 2, width // 2), mode="nearest") for c in crops])
    tile_maps = network(tiles)[1]
    h, w = features.shape[-2:]
    gy, gx = max(y // 16, 1), max(x // 16, 1)
    sizes = [(gy, gx), (gy, w - gx), (h - gy, gx), (h - gy, w - gx)]
    parts = [F.interpolate(tile_maps[q : q + 1], size=s, mode="nearest") for q, s in enumerate(sizes)]
    stitched = torch.cat([torch.cat(parts[:2], dim=3), torch.cat(parts[2:], dim=3)], dim=2)[0]
    p_class = F.multilabel_soft_margin_loss(stitched.mean(dim=(1, 2))[None], target[None])
    re = ((features - stitched).abs() * target[:, None, None]).mean()
    return p_class, re


@pytest.mark.parametrize("name", ["puzzle", "max", "cmax", "ctopk", "ctopk_w"])
def test_batched_tasks_equal_per_task_loop(name):
    torch.manual_seed(0)
    strategy = STRATEGIES[name]
    network = Classifier("resnet18", mode="fix", pretrained="none").eval()
    images = torch.randn(3, 3, 96, 128)
    labels = torch.tensor([[1.0, 0, 1, 0] + [0] * 16, [0, 1.0, 0, 0] + [0] * 16, [1.0, 1, 1, 0] + [0] * 16])
    with torch.no_grad():
        _, features = network(images)
        cams = make_cams(features)
        tasks = build_tasks(strategy, cams, labels, labels, (96, 128), k=3, min_distance=8)
        cuts = tasks.keypoints
        tiles = split_at_keypoints(images, tasks.image_index, cuts)
        stitched = stitch_tiles(network(tiles)[1], grid_cuts_from_pixel_cuts(cuts), features.shape[-2:])
        p_class, re = puzzle_losses(features, stitched, tasks.image_index, tasks.targets)

        expected = []
        for b in range(3):
            if strategy.per_class:
                for c in labels[b].nonzero().flatten().tolist():
                    target = F.one_hot(torch.tensor(c), 20).float()
                    expected.append(one_task_loop(images[b], features[b], cams[b, c], target, network, strategy, 3, 8))
            else:
                merged = (cams[b] * labels[b][:, None, None]).amax(0)
                expected.append(one_task_loop(images[b], features[b], merged, labels[b], network, strategy, 3, 8))
    assert len(tasks) == len(expected) == (6 if strategy.per_class else 3)
    assert p_class.item() == pytest.approx(torch.stack([e[0] for e in expected]).mean().item(), abs=1e-5)
    assert re.item() == pytest.approx(torch.stack([e[1] for e in expected]).mean().item(), abs=1e-5)


def test_channel_wise_tasks_have_one_hot_targets_and_image_level_ones_all_labels():
    labels = torch.zeros(2, 20)
    labels[0, [3, 7]] = 1
    labels[1, 5] = 1
    cams = torch.rand(2, 20, 4, 4)
    per_class = build_tasks(STRATEGIES["ctopk_w"], cams, labels, labels, (64, 64), k=2, min_distance=4)
    assert per_class.image_index.tolist() == [0, 0, 1]
    assert per_class.targets.argmax(1).tolist() == [3, 7, 5] and per_class.targets.sum().item() == 3
    image_level = build_tasks(STRATEGIES["max"], cams, labels, labels, (64, 64))
    assert torch.equal(image_level.targets, labels)


def test_all_zero_cams_fall_back_to_the_centre():
    labels = torch.zeros(2, 20)
    labels[:, 1] = 1
    for name in ("max", "cmax", "ctopk", "ctopk_w"):
        for rule in ("reference", "clean"):
            tasks = build_tasks(STRATEGIES[name], torch.zeros(2, 20, 4, 4), labels, labels, (64, 96), k=5,
                                min_distance=5, keypoint_rule=rule)
            assert tasks.keypoints.dtype == torch.int64
            assert tasks.keypoints.tolist() == [[32, 48]] * 2, (name, rule)


def test_no_positive_labels_gives_no_channel_wise_task_and_zero_losses():
    labels = torch.zeros(2, 20)
    tasks = build_tasks(STRATEGIES["cmax"], torch.rand(2, 20, 4, 4), labels, labels, (64, 64))
    assert len(tasks) == 0
    features = torch.randn(2, 20, 4, 4, requires_grad=True)
    p, re = puzzle_losses(features, torch.zeros(0, 20, 4, 4), tasks.image_index, tasks.targets)
    assert p.item() == 0 and re.item() == 0
    (p + re).backward()


@pytest.mark.parametrize("keypoint_rule", ["reference", "clean"])
@pytest.mark.parametrize("name", ["puzzle", "max", "cmax", "ctopk", "ctopk_w"])
def test_task_keypoints_equal_the_literal_rules(name, keypoint_rule):
    """Per positive class (or per image for Max, merged on the h x w grid first), as the reference scripts."""
    strategy = STRATEGIES[name]
    generator = torch.Generator().manual_seed(6)
    cams = make_cams(torch.randn(6, 20, 8, 8, generator=generator))
    labels = (torch.rand(6, 20, generator=generator) < 0.2).float()
    labels[:, 14] = 1.0  # at least one positive class per image
    tasks = build_tasks(strategy, cams, labels, labels, (128, 128), k=3, min_distance=6, keypoint_rule=keypoint_rule)
    expected = []
    for b in range(6):
        if strategy.per_class:
            maps = [cams[b, c] for c in labels[b].nonzero().flatten().tolist()]
        else:
            maps = [(cams[b] * labels[b][:, None, None]).amax(0)]
        expected += [oracle_cut(strategy, m, 128, 128, 3, 6, keypoint_rule) for m in maps]
    assert tasks.keypoints.dtype == torch.int64
    assert tasks.keypoints.tolist() == expected


def test_max_merges_the_classes_before_upsampling():
    generator = torch.Generator().manual_seed(8)
    cams = make_cams(torch.randn(16, 20, 8, 8, generator=generator))
    labels = torch.zeros(16, 20)
    labels[:, [2, 9, 17]] = 1.0
    tasks = build_tasks(STRATEGIES["max"], cams, labels, labels, (128, 128))
    upsampled_first = [oracles.argmax_reference(upsample_maps(cams[b, [2, 9, 17]], (128, 128)).amax(0).numpy())
                       for b in range(16)]
    merged_first = [oracles.argmax_reference(upsample_maps(cams[b, [2, 9, 17]].amax(0)[None], (128, 128))[0].numpy())
                    for b in range(16)]
    assert tasks.keypoints.tolist() == merged_first
    assert merged_first != upsampled_first  # the order matters on some images
