"""The fused CSI head against a literal per-class module written from the spec (method.md sections 1 and 6).

The oracle materialises x * cam_v for every class and runs it through nn.BatchNorm2d and
nn.Conv2d(C, 1, 1, bias=False), exactly as the reference's Classifier.forward(with_cam=True) does.
"""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.batchnorm import BNPlan
from core.csi import CSIHead, MaskedMoments

EPS = 1e-5
TOL = 1e-4  # relative to the largest magnitude of the reference tensor


class LiteralCSI(nn.Module):
    """The reference's CSI head, class by class (its attribute names, so its state-dict keys)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.BN = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(num_classes))
        self.stage6 = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for _ in range(num_classes))

    def forward(self, x: torch.Tensor, cams: torch.Tensor, update_running: bool = True) -> torch.Tensor:
        maps = []
        for v, (norm, conv) in enumerate(zip(self.BN, self.stage6)):
            masked = x * cams[:, v].unsqueeze(1)
            if self.training and not update_running:  # a DataParallel replica other than the first
                normed = F.batch_norm(masked, None, None, norm.weight, norm.bias, True, 0.0, norm.eps)
            else:
                normed = norm(masked)
            maps.append(conv(normed))
        return torch.cat(maps, dim=1).mean(dim=(2, 3))


def make_cam(features: torch.Tensor) -> torch.Tensor:
    """The reference's make_cam: ReLU(a - 1e-5) / (max_hw a + 1e-5), a = ReLU(features)."""
    activated = F.relu(features)
    peak = activated.flatten(2).max(dim=-1).values[..., None, None]
    return F.relu(activated - 1e-5) / (peak + 1e-5)


def randomise(head: CSIHead, seed: int = 0) -> None:
    """Non-trivial gamma, beta, conv weights and running statistics."""
    gen = torch.Generator().manual_seed(seed)
    shape = head.weight.shape
    with torch.no_grad():
        head.weight.copy_(0.5 + torch.rand(shape, generator=gen))
        head.bias.copy_(0.5 * torch.randn(shape, generator=gen))
        head.conv_weight.copy_(torch.randn(shape, generator=gen) / math.sqrt(shape[1]))
        head.running_mean.copy_(torch.rand(shape, generator=gen))
        head.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=gen))
        head.num_batches_tracked.fill_(3)


def literal_copy(head: CSIHead) -> LiteralCSI:
    """A LiteralCSI holding the head's values, copied by hand class by class."""
    literal = LiteralCSI(head.channels, head.num_classes)
    with torch.no_grad():
        for v in range(head.num_classes):
            literal.BN[v].weight.copy_(head.weight[v])
            literal.BN[v].bias.copy_(head.bias[v])
            literal.BN[v].running_mean.copy_(head.running_mean[v])
            literal.BN[v].running_var.copy_(head.running_var[v])
            literal.BN[v].num_batches_tracked.copy_(head.num_batches_tracked)
            literal.stage6[v].weight.copy_(head.conv_weight[v].view(1, -1, 1, 1))
    return literal


def make_inputs(batch: int, channels: int, classes: int, size: int = 8, seed: int = 1,
                zero_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-ReLU features and make_cam CAMs of random class maps (both leaves requiring grad)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.relu(torch.randn(batch, channels, size, size, generator=gen))
    cams = make_cam(torch.randn(batch, classes, size, size, generator=gen))
    if zero_class is not None:
        cams[:, zero_class] = 0.0
    return x.requires_grad_(), cams.requires_grad_()


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL, what: str = "",
               floor: float = 1e-12) -> None:
    """max |actual - expected| <= tol * max(max |expected|, floor)."""
    scale = expected.abs().max().clamp_min(floor)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


def run(module: nn.Module, x: torch.Tensor, cams: torch.Tensor, upstream: torch.Tensor,
        forward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradients of x, cams and every parameter for loss = sum(logits * upstream)."""
    x, cams = x.detach().clone().requires_grad_(), cams.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    logits = (forward or module)(x, cams)
    (logits * upstream).sum().backward()
    grads = {"x": x.grad, "cams": cams.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return logits.detach(), grads


def stacked_literal_grads(literal: LiteralCSI, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The literal module's parameter gradients stacked in the fused head's (V, C) layout."""
    classes = len(literal.BN)
    return {
        "x": grads["x"], "cams": grads["cams"],
        "weight": torch.stack([grads[f"BN.{v}.weight"] for v in range(classes)]),
        "bias": torch.stack([grads[f"BN.{v}.bias"] for v in range(classes)]),
        "conv_weight": torch.stack([grads[f"stage6.{v}.weight"].flatten() for v in range(classes)]),
    }


def assert_running_stats(head: CSIHead, literal: LiteralCSI) -> None:
    classes = head.num_classes
    assert_rel(head.running_mean, torch.stack([literal.BN[v].running_mean for v in range(classes)]),
               what="running_mean")
    assert_rel(head.running_var, torch.stack([literal.BN[v].running_var for v in range(classes)]),
               what="running_var")
    for v in range(classes):
        assert int(literal.BN[v].num_batches_tracked) == int(head.num_batches_tracked)


def compare(head: CSIHead, literal: LiteralCSI, x: torch.Tensor, cams: torch.Tensor, literal_forward=None,
            floor: float = 1e-12, plan: BNPlan | None = None) -> None:
    upstream = torch.randn(x.shape[0], head.num_classes, generator=torch.Generator().manual_seed(7))
    fused_logits, fused_grads = run(head, x, cams, upstream, partial(head, bn_plan=plan))
    literal_logits, literal_grads = run(literal, x, cams, upstream, literal_forward)
    assert fused_logits.dtype == torch.float32 and fused_logits.shape == literal_logits.shape
    assert_rel(fused_logits, literal_logits, what="logits")
    for name, expected in stacked_literal_grads(literal, literal_grads).items():
        assert fused_grads[name] is not None, name
        assert_rel(fused_grads[name], expected, what=f"grad {name}", floor=floor)
    assert_running_stats(head, literal)


def make_pair(channels: int, classes: int, train: bool) -> tuple[CSIHead, LiteralCSI]:
    torch.manual_seed(0)
    head = CSIHead(channels, classes)
    randomise(head)
    literal = literal_copy(head)
    return head.train(train), literal.train(train)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("zero_class", [None, 2], ids=["cams", "zero_cam"])
def test_fused_equals_literal(train: bool, zero_class: int | None) -> None:
    head, literal = make_pair(64, 5, train)
    x, cams = make_inputs(6, 64, 5, zero_class=zero_class)
    compare(head, literal, x, cams)
    if zero_class is not None and train:  # variance 0: the class scores sum_c w (beta) whatever the sample
        with torch.no_grad():
            logits = head(x, cams)
        expected = (head.conv_weight[zero_class] * head.bias[zero_class]).sum()
        assert torch.allclose(logits[:, zero_class], expected.expand(6), atol=1e-5)


def test_two_steps_update_running_stats_like_batchnorm() -> None:
    head, literal = make_pair(64, 5, True)
    for seed in (1, 2):
        compare(head, literal, *make_inputs(4, 64, 5, seed=seed))
    assert int(head.num_batches_tracked) == 5


def test_resnet50_shapes() -> None:
    head, literal = make_pair(2048, 20, True)
    compare(head, literal, *make_inputs(2, 2048, 20))


def grouped_literal(literal: LiteralCSI, plan: BNPlan):
    """Per call, per chunk forwards of the literal module; only each call's first chunk updates running stats."""

    def forward(x: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        pieces = []
        for call in range(0, x.shape[0], plan.call_size):
            for start in range(call, call + plan.call_size, plan.group_size):
                chunk = slice(start, start + plan.group_size)
                pieces.append(literal(x[chunk], cams[chunk], update_running=start == call))
        return torch.cat(pieces)

    return forward


@pytest.mark.parametrize("plan, batch", [
    (BNPlan(1, 1), 4), (BNPlan(1, 4), 8), (BNPlan(2, 4), 8), (BNPlan(8, 32), 32), (BNPlan(4, 4), 8),
    (BNPlan(3, 6), 12),
], ids=lambda p: f"{p.group_size}of{p.call_size}" if isinstance(p, BNPlan) else f"B{p}")
def test_grouped_equals_literal_emulation(plan: BNPlan, batch: int) -> None:
    head, literal = make_pair(32, 4, True)
    x, cams = make_inputs(batch, 32, 4, size=6, zero_class=1 if batch == 8 else None)
    # One-sample groups: the spatial mean of a sample normalised on its own is 0, so the logits are
    # sum_c w * beta and the gradients of x, cams and gamma vanish: the literal's are rounding noise
    # (up to ~1e-6 where an all-zero CAM divides it by sqrt(eps)), hence an absolute floor.
    floor = 1e-2 if plan.group_size == 1 else 1e-12
    compare(head, literal, x, cams, literal_forward=grouped_literal(literal, plan), floor=floor, plan=plan)
    assert int(head.num_batches_tracked) == 3 + batch // plan.call_size
    if plan.group_size == 1:
        with torch.no_grad():
            logits = head(x, cams, plan)
        assert torch.allclose(logits, (head.conv_weight * head.bias).sum(1).expand_as(logits), atol=1e-5)


def test_plan_covering_the_batch_is_plain_batchnorm() -> None:
    head, literal = make_pair(32, 4, True)
    compare(head, literal, *make_inputs(4, 32, 4), plan=BNPlan(8, 32))  # a batch of 4 is one call, one chunk
    with pytest.raises(ValueError, match="does not tile"):
        head(*make_inputs(4, 32, 4), BNPlan(3, 6))


def test_eval_ignores_plan_and_keeps_running_stats() -> None:
    head, literal = make_pair(32, 4, False)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    compare(head, literal, *make_inputs(4, 32, 4), plan=BNPlan(1, 2))
    for key, value in head.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_float32_under_autocast_channels_last_and_bf16_inputs() -> None:
    head, _ = make_pair(32, 4, True)
    x, cams = (t.detach() for t in make_inputs(4, 32, 4))
    with torch.no_grad():
        plain = head(x, cams)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = head(x, cams)
        channels_last = head(x.to(memory_format=torch.channels_last), cams)
        bf16 = head(x.bfloat16(), cams.bfloat16())
        bf16_expected = head(x.bfloat16().float(), cams.bfloat16().float())
    assert autocast.dtype == torch.float32 and bf16.dtype == torch.float32
    assert torch.allclose(autocast, plain, rtol=1e-6, atol=1e-6)
    assert torch.allclose(channels_last, plain, rtol=1e-5, atol=1e-5)
    assert torch.allclose(bf16, bf16_expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_masked_moments_values_and_gradcheck(channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(5, 3, 2, 3, dtype=torch.float64, generator=gen)  # batch 5: uneven chunks of the batch
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    masks = torch.rand(5, 2, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    features = x.requires_grad_().flatten(2).transpose(1, 2)  # (B, hw, C) as the head passes it
    first, second = MaskedMoments.apply(features, masks, True)
    products = masks[:, :, :, None] * features[:, None]  # (B, V, hw, C): the masked maps themselves
    assert torch.allclose(first, products.sum(2)) and torch.allclose(second, products.square().sum(2))
    assert torch.autograd.gradcheck(lambda f, m: MaskedMoments.apply(f, m, True), (features, masks))
    assert torch.autograd.gradcheck(lambda f, m: MaskedMoments.apply(f, m, False)[0], (features, masks))
    (first.sum() + second.sum()).backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_reference_state_round_trip() -> None:
    head, literal = make_pair(16, 3, True)
    assert set(head.reference_state()) == set(literal.state_dict())
    for key, value in head.reference_state().items():
        assert torch.equal(value, literal.state_dict()[key]), key
    other = LiteralCSI(16, 3)  # fresh values, loaded into the fused layout
    with torch.no_grad():
        for param in other.parameters():
            param.uniform_(-1, 1)
        for v in range(3):
            other.BN[v].running_var.uniform_(0.5, 2.0)
            other.BN[v].num_batches_tracked.fill_(11)
    loaded = CSIHead(16, 3)
    loaded.load_reference_state({f"csi.{k}": t for k, t in other.state_dict().items()}, prefix="csi.")
    for key, value in other.state_dict().items():
        assert torch.equal(loaded.reference_state()[key], value), key
    with pytest.raises(KeyError, match="stage6.2.weight"):
        loaded.load_reference_state({k: t for k, t in other.state_dict().items() if k != "stage6.2.weight"})


def test_init_matches_pytorch_defaults() -> None:
    head = CSIHead(256, 20)
    assert torch.equal(head.weight, torch.ones(20, 256)) and torch.equal(head.bias, torch.zeros(20, 256))
    assert torch.equal(head.running_mean, torch.zeros(20, 256)) and torch.equal(head.running_var, torch.ones(20, 256))
    bound = 1.0 / math.sqrt(256)  # Conv2d(256, 1, 1): kaiming_uniform(a=sqrt 5) on fan_in 256
    assert head.conv_weight.abs().max() <= bound and head.conv_weight.abs().max() > 0.95 * bound
    assert abs(float(head.conv_weight.detach().mean())) < 0.05 * bound
    names = {name for name, _ in head.named_parameters()}
    assert names == {"weight", "bias", "conv_weight"}


def test_shape_errors() -> None:
    head = CSIHead(8, 3).train()
    with pytest.raises(ValueError, match="features"):
        head(torch.rand(2, 4, 5, 5), torch.rand(2, 3, 5, 5))
    with pytest.raises(ValueError, match="cams"):
        head(torch.rand(2, 8, 5, 5), torch.rand(2, 2, 5, 5))
    with pytest.raises(ValueError, match="more than one value"):
        head(torch.rand(1, 8, 1, 1), torch.rand(1, 3, 1, 1))
