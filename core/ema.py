"""The EMA teacher: a gradient-free copy of the student, updated after every optimizer step."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def ema_momentum(step: int, alpha_ema: float) -> float:
    """a = min(1 - 1/(step + 1), alpha_ema): the teacher follows the student closely at first."""
    return min(1.0 - 1.0 / (step + 1), alpha_ema)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, step: int, alpha_ema: float) -> None:
    """teacher <- a * teacher + (1 - a) * student for every parameter; buffers are copied."""
    a = ema_momentum(step, alpha_ema)
    torch._foreach_lerp_(list(teacher.parameters()), [p.detach() for p in student.parameters()], 1.0 - a)
    torch._foreach_copy_(list(teacher.buffers()), list(student.buffers()))
