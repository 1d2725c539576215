"""The benchmark's per-task baseline against the batched step: the same losses and updates, batched differently."""
import copy

import pytest
import torch

from benchmarks.per_task_loop import per_task_step
from core.config import parse_args
from core.runtime import Runtime
from core.step import build_step, train_step

SIZE, BATCH, CLASSES = 64, 4, 20


def contexts(gpus: int, dtype: torch.dtype):
    args = parse_args({"strategy": "ctopk_w", "head": "csi"}, [
        "--demo", "--device", "cpu", "--image_size", str(SIZE), "--batch_size", str(BATCH),
        "--reference_gpus", str(gpus), "--min_distance", "3"])
    torch.manual_seed(0)
    batched = build_step(args, Runtime(torch.device("cpu")))
    for network in (batched.bare_student, batched.bare_teacher):
        network.to(dtype)
    per_task = copy.deepcopy(batched)  # the same weights, buffers and optimiser
    return batched, per_task


# float32 is what the benchmark times; float64 shows that nothing but rounding separates the two
@pytest.mark.parametrize("gpus,dtype", [(1, torch.float32), (4, torch.float32), (4, torch.float64)])
def test_per_task_loop_equals_batched_step(gpus, dtype):
    batched, per_task = contexts(gpus, dtype)
    gen = torch.Generator().manual_seed(1)
    labels = torch.zeros(BATCH, CLASSES)
    for i, classes in enumerate([(0, 5), (3,), (7, 8, 19), (12,)]):
        labels[i, list(classes)] = 1
    for iteration in (0, 5):
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=gen, dtype=dtype)
        ours = train_step(batched, [(images, labels)], iteration, 10)
        theirs = per_task_step(per_task, images, labels, iteration, 10)
        names = ("loss", "class_loss", "p_class_loss", "re_loss", "tasks_per_batch")  # per_task_step's order
        ours = torch.stack([ours[name] for name in names])
        torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)
        assert float(theirs[4]) == labels.sum()
    for ours, theirs in ((batched.bare_student, per_task.bare_student), (batched.bare_teacher, per_task.bare_teacher)):
        reference = theirs.state_dict()
        for key, value in ours.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-5, msg=key)
