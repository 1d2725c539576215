"""CUDA-only checks (skipped elsewhere): the fused CSI head and the grouped BatchNorm against their literal
forms on the GPU, in fp32 and under bf16 autocast; one training step of every strategy on the GPU, fed the
loader's uint8 batches; normalisation on the device equal to the CPU's.

benchmarks/gpu_check.sh runs this file with pytest, or, where pytest is not installed, as
`python3 tests/test_cuda.py` (a minimal runner below: every test_* function here takes no fixture).
"""
from __future__ import annotations

import copy
import sys
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # as conftest.py does under pytest
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

try:
    import pytest
except ImportError:  # the runner at the bottom; test_csi and test_batchnorm only decorate with pytest.mark
    identity = lambda *args, **kwargs: (lambda function: function)  # noqa: E731
    pytest = types.SimpleNamespace(mark=types.SimpleNamespace(parametrize=identity, skipif=identity),
                                   fixture=lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f)))
    sys.modules["pytest"] = pytest  # type: ignore[assignment]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from test_batchnorm import literal_calls, randomise_bn  # noqa: E402
from test_csi import literal_copy, make_inputs, randomise, stacked_literal_grads  # noqa: E402

from core.batchnorm import BNPlan, GroupedBatchNorm2d  # noqa: E402
from core.config import parse_args  # noqa: E402
from core.csi import CSIHead  # noqa: E402
from core.runtime import Runtime  # noqa: E402
from core.step import build_step, train_step  # noqa: E402
from core.strategies import STRATEGIES  # noqa: E402
from tools.augment import PackedImages, TrainTransform, normalize_packed  # noqa: E402

CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.detach().double().abs().max().clamp_min(1e-12)
    return float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max() / scale)


def head_outputs(module: nn.Module, x: torch.Tensor, cams: torch.Tensor, upstream: torch.Tensor,
                 autocast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and gradients (x, cams, parameters) of sum(logits * upstream), maybe under bf16 autocast."""
    x, cams = x.detach().clone().requires_grad_(), cams.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = module(x, cams)
    (logits.float() * upstream).sum().backward()
    return logits.float().detach(), {"x": x.grad, "cams": cams.grad,
                                     **{name: p.grad for name, p in module.named_parameters()}}


def test_fused_csi_head_equals_the_literal_one_on_cuda(device: torch.device = CUDA):
    """fp32: to 1e-4 of the largest value; bf16 autocast: to bf16's precision (both run the literal head's
    convolutions in bf16 too, so their errors are of the same size, not the same values)."""
    for autocast, tol in ((False, 1e-4), (True, 3e-2)):
        torch.manual_seed(0)
        head = CSIHead(64, 5)
        randomise(head)
        literal = literal_copy(head)
        head, literal = head.to(device).train(), literal.to(device).train()
        x, cams = (t.to(device) for t in make_inputs(6, 64, 5))
        upstream = torch.randn(6, 5, generator=torch.Generator().manual_seed(7)).to(device)
        fused_logits, fused_grads = head_outputs(head, x, cams, upstream, autocast)
        literal_logits, literal_grads = head_outputs(literal, x, cams, upstream, autocast)
        assert relative_error(fused_logits, literal_logits) <= tol, ("logits", autocast)
        for name, expected in stacked_literal_grads(literal, literal_grads).items():
            assert relative_error(fused_grads[name], expected) <= tol, (name, autocast)
        for ours, theirs in (("running_mean", "running_mean"), ("running_var", "running_var")):
            expected = torch.stack([getattr(literal.BN[v], theirs) for v in range(5)])
            assert relative_error(getattr(head, ours), expected) <= 1e-4, (ours, autocast)


def test_grouped_batchnorm_equals_per_chunk_batchnorm_on_cuda():
    for batch, call, gpus in ((12, 4, 4), (12, 4, 2), (24, 24, 4), (8, 4, 8)):
        torch.manual_seed(batch + call + gpus)
        literal = nn.BatchNorm2d(6)
        randomise_bn(literal, 1)
        ours = GroupedBatchNorm2d(6)
        ours.load_state_dict(literal.state_dict())
        literal, ours = literal.to(CUDA), ours.to(CUDA)
        x = (torch.randn(batch, 6, 5, 7) * 2 + 1).to(CUDA).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        expected = literal_calls(literal, x, call, gpus)
        got = ours(x2, BNPlan.for_calls(call, gpus))
        weights = torch.randn_like(expected)
        (expected * weights).sum().backward()
        (got * weights).sum().backward()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, literal.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.running_mean, literal.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, literal.running_var, rtol=1e-5, atol=1e-6)


def packed_batch(batch: int, size: int) -> PackedImages:
    """The loader's form: uint8 crops of noise images, some smaller than the crop (a padded border)."""
    transform = TrainTransform(size, size // 2, size * 3 // 2, packed=True)
    rng = np.random.default_rng(0)
    samples = [transform(noise_image(rng, size), np.random.default_rng(i)) for i in range(batch)]
    return PackedImages(torch.stack([s.pixels for s in samples]), torch.stack([s.boxes for s in samples]))


def noise_image(rng: np.random.Generator, size: int) -> Image.Image:
    height, width = int(rng.integers(size // 2, size * 2)), int(rng.integers(size // 2, size * 2))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_normalisation_on_the_device_equals_the_cpu():
    packed = packed_batch(6, 64)
    on_cpu = normalize_packed(packed)
    on_gpu = normalize_packed(PackedImages(packed.pixels.to(CUDA), packed.boxes.to(CUDA)))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=1e-6)
    assert torch.equal(on_gpu.cpu() == 0, on_cpu == 0)  # the pad stays exactly 0


def step_stats(strategy: str, amp: str, device: str, packed: PackedImages, labels: torch.Tensor) -> torch.Tensor:
    """train_step's stats of one step from the same initial weights and batch; asserts the weights moved."""
    args = parse_args({"strategy": strategy, "head": "csi"}, [
        "--data_dir", "unused", "--architecture", "resnet18", "--pretrained", "none", "--image_size", "64",
        "--batch_size", "4", "--reference_gpus", "2", "--min_distance", "3", "--alpha_re", "1", "--device", device,
        "--amp", amp])
    torch.manual_seed(0)
    ctx = build_step(args, Runtime(torch.device(device)))
    ctx.student.train()
    before = copy.deepcopy(ctx.bare_student.state_dict())
    stats = train_step(ctx, [(packed, labels)], 1, 10).values.float().cpu()
    after = ctx.bare_student.state_dict()
    moved = any(not torch.equal(before[k], v) for k, v in after.items() if v.is_floating_point())
    assert moved, (strategy, amp, device)
    return stats


def test_one_training_step_of_every_strategy_on_cuda(device: str = "cuda"):
    """Every strategy's step runs on CUDA in fp32 and bf16, fed the loader's uint8 batch: finite losses, the
    weights move, and the classification loss (the student's first forward, before any keypoint) is the CPU's
    to the precision of the forward."""
    packed = packed_batch(4, 64)
    labels = torch.zeros(4, 20)
    for i, classes in enumerate([(0, 5), (3,), (7, 8, 19), (12,)]):
        labels[i, list(classes)] = 1
    for strategy in STRATEGIES:
        cpu = step_stats(strategy, "off", "cpu", packed, labels)
        for amp, tol in (("off", 1e-3), ("bf16", 5e-2)):
            stats = step_stats(strategy, amp, device, packed, labels)
            assert torch.isfinite(stats[:4]).all(), (strategy, amp, stats)
            assert abs(float(stats[1] - cpu[1])) <= tol * max(1.0, float(cpu[1])), (strategy, amp, stats, cpu)


def main() -> int:
    """Without pytest: run every test_* function here, one line each; exit 1 on any failure, 2 without CUDA."""
    if not torch.cuda.is_available():
        print("test_cuda: no CUDA device; nothing run", file=sys.stderr)
        return 2
    failures = 0
    for name, function in sorted((n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)):
        try:
            function()
            print(f"PASSED {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every test, then the count
            failures += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
    print(f"{failures} failed" if failures else "all CUDA tests passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
