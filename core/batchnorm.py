"""BatchNorm statistics grouped as the reference's calls and DataParallel chunks grouped them.

The published run called its networks once per piece of work (the student once per batch, the
patch network once per task) under `nn.DataParallel` over 4 GPUs. Each call's batch was split
with `torch.chunk` into one chunk per GPU: every chunk was normalised with its own statistics,
and only the first chunk (the replica sharing the module's buffers) updated the running
statistics. We run all calls of an iteration as one batched forward, so a `BNPlan` tells every
BatchNorm how the batch splits into the reference's calls and chunks (method.md section 6). The plan
is an argument of each call: the step passes it to the model (`Classifier.forward(images, bn_plan)`),
and the model hands it to each GroupedBatchNorm2d and to the CSI head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class BNPlan:
    """A batch of `calls * call_size` samples: `call_size` consecutive samples made one reference
    call; each call splits into chunks of `group_size` samples normalised together; the first chunk
    of each call updates the running statistics, calls in order."""

    group_size: int
    call_size: int
    update_stats: bool = True  # False: normalise as planned, leave the running statistics alone

    @classmethod
    def for_calls(cls, call_size: int, gpus: int, update_stats: bool = True) -> BNPlan:
        """Chunks of one `call_size` call over `gpus` devices: torch.chunk makes them ceil(n / gpus) long."""
        return cls(math.ceil(call_size / gpus), call_size, update_stats)

    def check(self, batch: int) -> None:
        if batch % self.call_size or self.call_size % self.group_size:
            raise ValueError(f"{self} does not tile a batch of {batch}")


def fold_running_stats(running_mean: torch.Tensor, running_var: torch.Tensor, means: torch.Tensor,
                       variances: torch.Tensor, momentum: float) -> None:
    """Apply K sequential BatchNorm updates r <- (1 - m) r + m s_k (k = 0..K-1) in one step.

    means, variances: (K, ...) per-update statistics (variances unbiased, as BatchNorm stores them).
    """
    steps = means.shape[0]
    keep = 1.0 - momentum
    # weight of update k in the final value: m (1 - m)^(K - 1 - k)
    weights = momentum * keep ** torch.arange(steps - 1, -1, -1, device=means.device, dtype=torch.float64)
    weights = weights.to(means.dtype).view(-1, *([1] * (means.dim() - 1)))
    # Through .data, which autograd does not version: an earlier training-mode batch_norm of the same
    # iteration saved these buffers for its backward (which never reads them in training mode), and
    # a versioned in-place update would make that backward refuse to run.
    running_mean.data.mul_(keep ** steps).add_((weights * means).sum(0).to(running_mean.dtype))
    running_var.data.mul_(keep ** steps).add_((weights * variances).sum(0).to(running_var.dtype))


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that follows the `bn_plan` of its call in training mode (None: one call, one chunk,
    i.e. plain BN). Same parameters, buffers and state-dict keys as nn.BatchNorm2d; evaluation is unchanged.
    """

    def forward(self, x: torch.Tensor, bn_plan: BNPlan | None = None) -> torch.Tensor:
        plan = bn_plan
        n = x.shape[0]
        if not self.training or plan is None or (plan.update_stats and plan.group_size >= n and plan.call_size >= n):
            return super().forward(x)
        plan.check(n)
        groups, size = n // plan.group_size, plan.group_size
        _, channels, height, width = x.shape
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        if size == 1:  # each sample alone: (1, n*C, H, W) normalises each (sample, channel) over H, W
            stacked = x.reshape(1, n * channels, height, width)
        else:  # groups as extra channels: (g, G*C, H, W) normalises each (group, channel) over its samples
            stacked = x.reshape(groups, size, channels, height, width).transpose(0, 1).reshape(
                size, groups * channels, height, width)
        # native_batch_norm also returns each (group, channel)'s mean and 1/std: the running statistics
        # need them for the first group of every call, at no extra pass over the data
        out, mean, inv_std = torch.native_batch_norm(stacked, weight, bias, None, None, True, 0.0, self.eps)
        if self.track_running_stats and plan.update_stats:
            self._update_running_stats(mean.detach(), inv_std.detach(), plan, groups, size * height * width)
        if size == 1:
            return out.view(n, channels, height, width)
        return out.view(size, groups, channels, height, width).transpose(0, 1).reshape(n, channels, height, width)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, inv_std: torch.Tensor, plan: BNPlan, groups: int,
                              count: int) -> None:
        firsts = torch.arange(0, groups, plan.call_size // plan.group_size, device=mean.device)
        mean, inv_std = mean.view(groups, -1)[firsts].double(), inv_std.view(groups, -1)[firsts].double()
        variances = (inv_std.pow(-2) - self.eps) * (count / max(count - 1, 1))  # unbiased, as BatchNorm keeps
        fold_running_stats(self.running_mean, self.running_var, mean, variances, self.momentum)
        self.num_batches_tracked.add_(len(firsts))


def to_grouped_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every plain nn.BatchNorm2d below `module` for a GroupedBatchNorm2d holding the same tensors."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            grouped = GroupedBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum,
                                         affine=child.affine, track_running_stats=child.track_running_stats)
            grouped.load_state_dict(child.state_dict())
            setattr(module, name, grouped)
        else:
            to_grouped_batchnorm(child)
    return module
