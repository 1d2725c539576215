"""The EMA teacher: a second network that never receives gradients, following the student's parameters."""
from __future__ import annotations

import torch
import torch.nn as nn


def freeze_as_teacher(network: nn.Module) -> nn.Module:
    """The reference builds the teacher as an independent network (its own random heads) and detaches
    its parameters; the first update (a = 0) makes them the student's. It stays in train mode."""
    for param in network.parameters():
        param.requires_grad_(False)
    return network.train()


def ema_momentum(step: int, alpha_ema: float) -> float:
    """a = min(1 - 1/(step + 1), alpha_ema): the teacher follows the student closely at first."""
    return min(1.0 - 1.0 / (step + 1), alpha_ema)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, step: int, alpha_ema: float) -> None:
    """teacher <- a * teacher + (1 - a) * student, parameters only: BatchNorm buffers stay the teacher's own."""
    a = ema_momentum(step, alpha_ema)
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - a)
