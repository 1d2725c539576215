"""The Class-Specific Instance (CSI) head, fused: exact, without the per-class masked feature maps.

For every class v the reference computes s_v = conv_v(BN_v(x * cam_v)) and scores the class with
the spatial mean of s_v (method.md section 1). Written literally that materialises a
B x V x C x h x w tensor (5.4 GB in fp32 at resnet50 / 512 px / batch 32) and keeps several of
them for the backward. BatchNorm is a per-channel affine map and the 1x1 conv is linear, so the
spatial mean of s_v only needs two moments per (sample, class, channel):

    P[i, v, c] = sum_hw x[i, c] * cam[i, v]          Q[i, v, c] = sum_hw (x[i, c] * cam[i, v])^2

(two batched matmuls). The batch statistics of x * cam_v over a group of samples are
mean = sum P / M and biased var = sum Q / M - mean^2 (M = samples * h * w), and

    logits[i, v] = sum_c a[v, c] * P[i, v, c] / (h w) + const[v],
    a = w_v * gamma_v / sqrt(var + eps),   const = sum_c w_v * (beta_v - gamma_v * mean / sqrt(var + eps)).

Gradients flow through all of it to x, the CAMs, gamma, beta and the conv weights.

Numerics: the head runs in float32 whatever the autocast. P and Q come from float32 matmuls; their
group sums, the statistics and the logits are float64, because E[(x cam)^2] - mean^2 cancels when a
channel's masked values are nearly constant over a group. The measured error is in docs/speed.md.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from core.batchnorm import BNPlan, fold_running_stats

# The small (groups, V, C) statistics in float64: var = E[(x cam)^2] - mean^2 cancels, and tensors
# of B x V x C cost nothing next to the two matmuls over B x C x h x w.
STATS_DTYPE = torch.float64


class MaskedMoments(torch.autograd.Function):
    """P = masks @ features and Q = masks^2 @ features^2 (B, V, C), saving only the two inputs.

    features: (B, hw, C), any strides (a view of NCHW or channels_last x); masks: (B, V, hw).
    Autograd through the plain expressions would keep features^2 for the backward and allocate
    several x-sized temporaries there; this keeps the head's extra memory near one x-sized tensor
    (the gradient of x itself), computed in x's own memory layout.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor, masks: torch.Tensor,
                with_second: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        ctx.save_for_backward(features, masks)
        ctx.with_second = with_second
        first = torch.bmm(masks, features)
        if not with_second:
            return first, None
        second = first.new_empty(first.shape)
        squared_masks = masks * masks
        for part in _batch_chunks(features.shape[0]):  # features^2 a few samples at a time
            torch.bmm(squared_masks[part], features[part].square(), out=second[part])
        return first, second

    @staticmethod
    def backward(ctx, grad_first: torch.Tensor,
                 grad_second: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        features, masks = ctx.saved_tensors
        if grad_first is None:
            grad_first = torch.zeros(masks.shape[0], masks.shape[1], features.shape[2], dtype=features.dtype,
                                     device=features.device)
        if not ctx.with_second or grad_second is None:
            grad_second = torch.zeros_like(grad_first)
        grad_features = grad_masks = None
        if ctx.needs_input_grad[0]:
            grad_features = _features_gradient(features, masks, grad_first, grad_second)
        if ctx.needs_input_grad[1]:
            # dP/dmasks = features, dQ/dmasks = 2 masks features^2
            grad_masks = torch.bmm(grad_first, features.transpose(1, 2))
            for part in _batch_chunks(features.shape[0]):
                squared = torch.bmm(grad_second[part], features[part].square().transpose(1, 2))
                grad_masks[part] += 2 * masks[part] * squared
        return grad_features, grad_masks, None


def _batch_chunks(batch: int, pieces: int = 4) -> list[slice]:
    """About `pieces` contiguous slices of the batch: bounds a squared-features temporary to ~1/pieces of x."""
    step = max(1, math.ceil(batch / pieces))
    return [slice(start, start + step) for start in range(0, batch, step)]


def _features_gradient(features: torch.Tensor, masks: torch.Tensor, grad_first: torch.Tensor,
                       grad_second: torch.Tensor) -> torch.Tensor:
    """masks^T @ dP + 2 features * (masks^2)^T @ dQ, written into one tensor laid out like `features`."""
    squared_masks = masks * masks
    if features.is_contiguous():  # channels_last x: (B, hw, C) rows
        grad = torch.bmm(squared_masks.transpose(1, 2), grad_second)
        grad.mul_(features).mul_(2.0)
        return grad.baddbmm_(masks.transpose(1, 2), grad_first)
    # NCHW x: build the (B, C, hw) transpose, contiguous like x, and hand back its transposed view
    grad = torch.bmm(grad_second.transpose(1, 2), squared_masks)
    grad.mul_(features.transpose(1, 2)).mul_(2.0)
    return grad.baddbmm_(grad_first.transpose(1, 2), masks).transpose(1, 2)


class CSIHead(nn.Module):
    """Per-class BatchNorm2d(C) + 1x1 conv C -> 1 on the CAM-masked features, averaged over h, w.

    Parameters, stacked over classes (row v = class v): `weight` (V, C) BatchNorm gamma and
    `conv_weight` (V, C) the 1x1 conv (both "scratch weights"), `bias` (V, C) BatchNorm beta
    ("scratch bias"). Buffers as nn.BatchNorm2d: `running_mean`, `running_var` (V, C),
    `num_batches_tracked`. In training mode with a `bn_plan` argument (core.batchnorm), every contiguous
    group of `group_size` samples is normalised with its own statistics and the running statistics
    are folded in from the first group of each call, calls in order.
    """

    def __init__(self, channels: int, num_classes: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_classes, channels))
        self.bias = nn.Parameter(torch.zeros(num_classes, channels))
        # each row as PyTorch's default Conv2d(C, 1, 1) init: kaiming_uniform(a=sqrt(5)) on fan_in C
        self.conv_weight = nn.Parameter(torch.empty(num_classes, channels))
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        self.register_buffer("running_mean", torch.zeros(num_classes, channels))
        self.register_buffer("running_var", torch.ones(num_classes, channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, eps={self.eps}, momentum={self.momentum}"

    def forward(self, x: torch.Tensor, cams: torch.Tensor, bn_plan: BNPlan | None = None) -> torch.Tensor:
        """x: (B, C, h, w) features, cams: (B, V, h, w) class maps (gradient kept) -> logits (B, V), float32."""
        self._check_shapes(x, cams)
        batch, _, height, width = x.shape
        pixels = height * width
        # float32 whatever the autocast: the moments feed a cancelling difference
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = x.float().flatten(2).transpose(1, 2)  # (B, hw, C): a view for NCHW and channels_last
            masks = cams.float().flatten(2)  # (B, V, hw)
            first, second = MaskedMoments.apply(features, masks, self.training)  # P, Q: (B, V, C)
            if self.training:
                mean, var, group_size = self._batch_statistics(first, second, pixels, bn_plan)
            else:
                mean, var, group_size = self.running_mean[None], self.running_var[None], batch
            return self._logits(first, mean.to(STATS_DTYPE), var.to(STATS_DTYPE), group_size, pixels)

    def _check_shapes(self, x: torch.Tensor, cams: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"CSIHead expects features (B, {self.channels}, h, w), got {tuple(x.shape)}")
        expected = (x.shape[0], self.num_classes, *x.shape[2:])
        if tuple(cams.shape) != expected:
            raise ValueError(f"CSIHead expects cams of shape {expected}, got {tuple(cams.shape)}")

    @staticmethod
    def _group_size(batch: int, plan: BNPlan | None) -> int:
        if plan is None or (plan.group_size >= batch and plan.call_size >= batch):
            return batch
        plan.check(batch)
        return plan.group_size

    def _batch_statistics(self, first: torch.Tensor, second: torch.Tensor, pixels: int,
                          plan: BNPlan | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-group mean and biased variance (groups, V, C) of x * cam_v; folds the running statistics."""
        batch = first.shape[0]
        group_size = self._group_size(batch, plan)
        count = group_size * pixels  # M: values per (group, class, channel)
        if count == 1:
            raise ValueError("CSIHead: BatchNorm needs more than one value per channel in training "
                             f"(group of {group_size} sample(s), {pixels} pixel(s))")
        groups = batch // group_size
        moment1 = first.to(STATS_DTYPE).view(groups, group_size, *first.shape[1:]).sum(1)
        moment2 = second.to(STATS_DTYPE).view(groups, group_size, *second.shape[1:]).sum(1)
        mean = moment1 / count
        # clamp: rounding can leave a tiny negative where the variance is 0 (e.g. an all-zero CAM)
        var = (moment2 / count - mean * mean).clamp_min(0.0)
        if plan is None or plan.update_stats:
            self._update_running_statistics(mean.detach(), var.detach(), batch, group_size, count, plan)
        return mean, var, group_size

    @torch.no_grad()
    def _update_running_statistics(self, mean: torch.Tensor, var: torch.Tensor, batch: int, group_size: int,
                                   count: int, plan: BNPlan | None) -> None:
        """As nn.BatchNorm2d (unbiased running variance), from the first group of each call, calls in order."""
        call_size = batch if plan is None or group_size == batch else plan.call_size
        calls = batch // call_size
        firsts = torch.arange(calls, device=mean.device) * (call_size // group_size)
        unbiased = var[firsts] * (count / (count - 1))
        fold_running_stats(self.running_mean, self.running_var, mean[firsts], unbiased, self.momentum)
        self.num_batches_tracked.add_(calls)

    def _logits(self, first: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, group_size: int,
                pixels: int) -> torch.Tensor:
        """sum_c a * P / hw + const per sample, with a and const of the sample's group (mean, var: (G, V, C))."""
        batch = first.shape[0]
        inv_std = torch.rsqrt(var + self.eps)
        gamma, beta, conv = (p.to(STATS_DTYPE) for p in (self.weight, self.bias, self.conv_weight))
        scale = conv * gamma * inv_std  # a: (G, V, C)
        const = (conv * (beta - gamma * mean * inv_std)).sum(-1)  # (G, V)
        grouped = first.to(STATS_DTYPE).view(-1, group_size, *first.shape[1:])  # (G, g, V, C)
        logits = (grouped * scale[:, None]).sum(-1) / pixels + const[:, None]  # (G, g, V)
        return logits.reshape(batch, -1).float()

    # ------------------------------------------------------------------ reference layout
    def load_reference_state(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Load the reference's per-class keys: `{prefix}BN.{v}.weight|bias|running_mean|running_var|
        num_batches_tracked` and `{prefix}stage6.{v}.weight` (1, C, 1, 1), for v in 0..V-1."""
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in ("weight", "bias", "running_mean",
                                                                       "running_var", "conv_weight")}
        for v in range(self.num_classes):
            for name in ("weight", "bias", "running_mean", "running_var"):
                rows[name].append(_reference_tensor(state, f"{prefix}BN.{v}.{name}", (self.channels,)))
            rows["conv_weight"].append(
                _reference_tensor(state, f"{prefix}stage6.{v}.weight", (1, self.channels, 1, 1)).reshape(-1))
        with torch.no_grad():
            for name, tensors in rows.items():
                getattr(self, name).copy_(torch.stack(tensors))
            tracked = state.get(f"{prefix}BN.0.num_batches_tracked")
            if tracked is not None:
                self.num_batches_tracked.copy_(tracked)

    def reference_state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """This head's tensors under the reference's per-class keys (the inverse of load_reference_state)."""
        state = {}
        for v in range(self.num_classes):
            for name in ("weight", "bias", "running_mean", "running_var"):
                state[f"{prefix}BN.{v}.{name}"] = getattr(self, name)[v].detach().clone()
            state[f"{prefix}BN.{v}.num_batches_tracked"] = self.num_batches_tracked.clone()
            state[f"{prefix}stage6.{v}.weight"] = self.conv_weight[v].detach().reshape(1, -1, 1, 1).clone()
        return state


def _reference_tensor(state: Mapping[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state:
        raise KeyError(f"reference state has no {key!r}")
    tensor = state[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"reference {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor
