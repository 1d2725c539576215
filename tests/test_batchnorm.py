"""BatchNorm grouped as the reference's calls and DataParallel chunks, against a literal emulation.

The oracle runs each reference call on its own and cuts it with torch.chunk into one piece per
GPU: every piece is normalised with its own statistics through a model with ordinary
nn.BatchNorm2d, and only the first piece (DataParallel's replica 0, which shares the module's
buffers) updates the running statistics; the other pieces' updates are thrown away.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from core.batchnorm import BNPlan, GroupedBatchNorm2d, fold_running_stats, to_grouped_batchnorm
from core.builder import Classifier


def literal_call(model: nn.Module, x: torch.Tensor, gpus: int):
    """One reference call under DataParallel over `gpus` devices, emulated on one device."""
    outputs = []
    for index, piece in enumerate(x.chunk(gpus)):
        if index == 0:
            outputs.append(model(piece))
            continue
        # replica > 0: the same parameters, its own copy of the buffers, whose updates are lost
        buffers = {name: value.clone() for name, value in model.named_buffers()}
        outputs.append(functional_call(model, buffers, (piece,)))
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def literal_calls(model: nn.Module, x: torch.Tensor, call_size: int, gpus: int):
    outputs = [literal_call(model, call, gpus) for call in x.split(call_size)]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


def to_plain_batchnorm(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, GroupedBatchNorm2d):
            plain = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum).to(child.weight.dtype)
            plain.load_state_dict(child.state_dict())
            setattr(model, name, plain)
        else:
            to_plain_batchnorm(child)
    return model


def randomise_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.1
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("batch,call,gpus", [(12, 4, 4), (12, 4, 2), (12, 4, 1), (12, 4, 3), (24, 24, 4),
                                             (16, 16, 4), (8, 4, 8)])
def test_layer_matches_literal_chunks(batch, call, gpus):
    torch.manual_seed(batch + call + gpus)
    literal = nn.BatchNorm2d(6)
    randomise_bn(literal, 1)
    ours = GroupedBatchNorm2d(6)
    ours.load_state_dict(literal.state_dict())
    x = (torch.randn(batch, 6, 5, 7) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    expected = literal_calls(literal, x, call, gpus)
    got = ours(x2, BNPlan.for_calls(call, gpus))
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, literal.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias.grad, literal.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, literal.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var, literal.running_var, rtol=1e-5, atol=1e-6)


def test_chunk_sizes_follow_torch_chunk():
    assert BNPlan.for_calls(4, 4) == BNPlan(1, 4)
    assert BNPlan.for_calls(4, 3) == BNPlan(2, 4)  # torch.chunk(4 items, 3) gives 2 + 2
    assert BNPlan.for_calls(4, 8) == BNPlan(1, 4)
    assert BNPlan.for_calls(32, 4) == BNPlan(8, 32)


def test_sequential_fold_equals_step_by_step_updates():
    gen = torch.Generator().manual_seed(0)
    means, variances = torch.randn(7, 3, generator=gen), torch.rand(7, 3, generator=gen)
    mean, var = torch.randn(3, generator=gen), torch.rand(3, generator=gen)
    expected_mean, expected_var = mean.clone(), var.clone()
    for m, v in zip(means, variances):
        expected_mean = 0.9 * expected_mean + 0.1 * m
        expected_var = 0.9 * expected_var + 0.1 * v
    fold_running_stats(mean, var, means, variances, 0.1)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(var, expected_var)


def test_no_plan_and_eval_are_plain_batchnorm():
    literal = nn.BatchNorm2d(4)
    randomise_bn(literal, 2)
    ours = to_grouped_batchnorm(nn.Sequential(copy.deepcopy(literal)))[0]
    assert isinstance(ours, GroupedBatchNorm2d)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(ours(x), literal(x))
    torch.testing.assert_close(ours.running_var, literal.running_var)
    ours.eval(), literal.eval()
    torch.testing.assert_close(ours(x, BNPlan(1, 2)), literal(x))  # evaluation ignores the plan


@pytest.mark.parametrize("head", ["gap", "csi"])
@pytest.mark.parametrize("gpus", [1, 4])
def test_whole_network_student_and_tile_calls(head, gpus):
    """The student's batch call (8 images) then per-task tile calls (4 tiles each), as the Max script makes them."""
    torch.manual_seed(3)
    # float64: BatchNorm over a one-tile chunk (16 values per channel at layer4) is ill-conditioned
    # enough that float32 rounding alone separates two exact implementations by ~1e-3
    ours = Classifier("resnet18", num_classes=5, pretrained="none", head=head).train()
    randomise_bn(ours, 4)
    ours.double()
    literal = to_plain_batchnorm(copy.deepcopy(ours))
    images, tiles = torch.randn(8, 3, 64, 64).double(), torch.randn(12, 3, 64, 64).double()
    logits, features = ours(images, bn_plan=BNPlan(8 // gpus, 8))
    tile_logits, tile_maps = ours(tiles, bn_plan=BNPlan.for_calls(4, gpus))
    expected_logits, expected_features = literal_call(literal, images, gpus)
    expected_tile_logits, expected_tile_maps = literal_calls(literal, tiles, 4, gpus)
    for got, want in ((logits, expected_logits), (features, expected_features), (tile_logits, expected_tile_logits),
                      (tile_maps, expected_tile_maps)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    (logits.sum() + features.square().mean() + tile_maps.square().mean() + tile_logits.sum()).backward()
    (expected_logits.sum() + expected_features.square().mean() + expected_tile_maps.square().mean()
     + expected_tile_logits.sum()).backward()
    # all gradients as one vector: some are analytically zero (e.g. the CSI head's gamma when a chunk
    # holds one tile) and carry only rounding noise, so the tolerance follows the overall scale
    our_grads = torch.cat([p.grad.flatten() for p in ours.parameters()])
    their_grads = torch.cat([p.grad.flatten() for p in literal.parameters()])
    torch.testing.assert_close(our_grads, their_grads, rtol=1e-7, atol=1e-9 * their_grads.abs().max().item())
    their_stats = literal.state_dict()
    for key, value in ours.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(value, their_stats[key], rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("head", ["gap", "csi"])
def test_plan_without_statistics_normalises_the_same_and_keeps_the_running_statistics(head):
    """--patch_bn_update off: tile calls normalise per chunk as planned but leave the running statistics alone."""
    torch.manual_seed(5)
    model = Classifier("resnet18", num_classes=5, pretrained="none", head=head).train()
    randomise_bn(model, 6)
    tiles = torch.randn(8, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    frozen = model(tiles, bn_plan=BNPlan.for_calls(4, 4, update_stats=False))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    updating = model(tiles, bn_plan=BNPlan.for_calls(4, 4))
    torch.testing.assert_close(frozen, updating)
    assert not torch.equal(model.state_dict()["backbone.1.running_mean"], before["backbone.1.running_mean"])
