"""Peak memory and time of the CSI head's forward + backward: the literal per-class form vs the fused head.

    python benchmarks/csi_head.py                  # CPU, resnet50 shapes: x 8 x 2048 x 32 x 32, 20 classes
    python benchmarks/csi_head.py --device cuda    # batch 32 (512-px training) on the GPU

The literal form is the reference's loop (per class: x * cam_v, BatchNorm2d(C), Conv2d(C, 1, 1),
then the spatial mean), with the CAM broadcast instead of `repeat`ed over the channels (the repeat
would only add memory). The fused form is core.csi.CSIHead. Both run in training mode on the same
inputs (post-ReLU features, CAMs from the reference's make_cam) with the same weights, and both
back-propagate into x, the CAMs and every parameter. Every variant runs in a fresh subprocess so
that neither inherits the other's allocator state. See benchmarks/README.md ("CSI head").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/csi_head.py` from any folder
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.measure import MemoryProbe, synchronize  # noqa: E402
from core.csi import CSIHead  # noqa: E402
from core.runtime import processor_name  # noqa: E402

MIB = 1024.0 * 1024.0
VARIANTS = ("literal", "fused")


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    classes: int
    size: int  # h = w of the feature map

    @property
    def feature_mib(self) -> float:
        return self.batch * self.channels * self.size * self.size * 4 / MIB


class LiteralCSIHead(nn.Module):
    """The CSI head written class by class, as the reference's forward(with_cam=True) does."""

    def __init__(self, fused: CSIHead) -> None:
        super().__init__()
        channels, classes = fused.channels, fused.num_classes
        self.BN = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(classes))
        self.stage6 = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for _ in range(classes))
        self.load_state_dict(fused.reference_state())

    def forward(self, x: torch.Tensor, cams: torch.Tensor) -> torch.Tensor:
        maps = [conv(norm(x * cams[:, v].unsqueeze(1))) for v, (norm, conv) in enumerate(zip(self.BN, self.stage6))]
        return torch.cat(maps, dim=1).mean(dim=(2, 3))


def make_cam(features: torch.Tensor) -> torch.Tensor:
    """The reference's make_cam: ReLU(a - 1e-5) / (max_hw a + 1e-5), a = ReLU(features)."""
    activated = F.relu(features)
    return F.relu(activated - 1e-5) / (activated.amax(dim=(2, 3), keepdim=True) + 1e-5)


def build(variant: str, shape: Shape, device: torch.device, seed: int = 0):
    """(module, x, cams, upstream gradient) for one variant; the same values for every variant."""
    torch.manual_seed(seed)
    fused = CSIHead(shape.channels, shape.classes)
    module = fused if variant == "fused" else LiteralCSIHead(fused)
    gen = torch.Generator().manual_seed(seed + 1)
    x = F.relu(torch.randn(shape.batch, shape.channels, shape.size, shape.size, generator=gen))
    cams = make_cam(torch.randn(shape.batch, shape.classes, shape.size, shape.size, generator=gen))
    upstream = torch.randn(shape.batch, shape.classes, generator=gen)
    x, cams, upstream = (t.to(device) for t in (x, cams, upstream))
    return module.to(device).train(), x.requires_grad_(), cams.requires_grad_(), upstream


def step(module: nn.Module, x: torch.Tensor, cams: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """One forward + backward (loss = sum(logits * upstream)); gradients are dropped afterwards."""
    logits = module(x, cams)
    (logits * upstream).sum().backward()
    x.grad = cams.grad = None
    module.zero_grad(set_to_none=True)
    return logits.detach()


def measure(variant: str, shape: Shape, device: torch.device, warmup: int = 1, repeats: int = 5,
            seed: int = 0) -> dict:
    """Time and peak memory growth of `warmup + repeats` forward + backward steps of one variant."""
    module, x, cams, upstream = build(variant, shape, device, seed)
    probe = MemoryProbe(device)
    growths, times, logits = [], [], None
    for index in range(warmup + repeats):
        probe.start()
        begin = time.perf_counter()
        logits = step(module, x, cams, upstream)
        synchronize(device)
        elapsed = time.perf_counter() - begin
        growths.append(probe.read()[1])  # the step's peak minus the level before it
        if index >= warmup:
            times.append(elapsed)
    median = statistics.median(times)
    tensor_peak = tensor_peak_mib(module, x, cams, upstream) if device.type == "cpu" else None
    return {
        "variant": variant, "first_step_mib": growths[0], "peak_mib": max(growths[warmup:] or growths),
        "tensor_peak_mib": tensor_peak,
        "ms": 1000 * median, "spread": (max(times) - min(times)) / median, "times_ms": [1000 * t for t in times],
        "peak_resettable": probe.resettable, "logits": logits.cpu().tolist(),
    }


def tensor_peak_mib(module: nn.Module, x: torch.Tensor, cams: torch.Tensor, upstream: torch.Tensor) -> float | None:
    """CPU: the most tensor memory live at once during one more step, from torch.profiler's allocation
    events (what the step allocates, without allocator overhead); None where that API is missing."""
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step(module, x, cams, upstream)
        sizes: list[tuple[int, int]] = []
        pending = list(prof.profiler.kineto_results.experimental_event_tree())
        while pending:
            node = pending.pop()
            if node.tag == _EventType.Allocation:  # alloc_size < 0 for a free
                sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
            pending.extend(node.children)
    except (ImportError, AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak / MIB


def spawn(variant: str, args: argparse.Namespace) -> dict:
    """Run `measure` for one variant in a fresh Python process; return its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--device", args.device,
               "--batch", str(args.batch), "--channels", str(args.channels), "--classes", str(args.classes),
               "--size", str(args.size), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict], shape: Shape, args: argparse.Namespace) -> str:
    """The side-by-side table, the ratio lines and the run's context, as markdown."""
    literal, fused = results["literal"], results["fused"]
    lines = [
        f"- command: python benchmarks/csi_head.py {' '.join(sys.argv[1:])}".rstrip(),
        f"- machine: {processor_name()}, {os.cpu_count()} logical CPUs visible; "
        f"{platform.platform()}",
        f"- device: {_device_name(args.device)}; torch {torch.__version__}, "
        f"intra-op threads {args.threads or torch.get_num_threads()}",
        f"- load average (1/5/15 min) at start: {args.load_at_start}",
        f"- shape: x {shape.batch} x {shape.channels} x {shape.size} x {shape.size} fp32 "
        f"({shape.feature_mib:.0f} MiB), "
        f"{shape.classes} classes; the literal's B x V x C x h x w tensor: {shape.feature_mib * shape.classes:.0f} MiB",
        f"- memory: {_memory_words(args.device)}",
        f"- time: median over {args.rounds} round(s) of {args.repeats} forward + backward steps, each after "
        f"{args.warmup} warm-up step(s) in a fresh process per variant and round, the variants alternating; "
        "memory columns: the largest over the rounds",
        "",
        "| variant | peak MiB | tensor peak MiB | first step MiB | ms (fwd+bwd) | spread |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        r = results[name]
        tensors = "n/a" if r["tensor_peak_mib"] is None else f"{r['tensor_peak_mib']:.1f}"
        lines.append(f"| {name} | {r['peak_mib']:.1f} | {tensors} | {r['first_step_mib']:.1f} | {r['ms']:.1f} | "
                     f"{100 * r['spread']:.0f}% |")
    expected = torch.tensor(literal["logits"], dtype=torch.float64)
    gap = (torch.tensor(fused["logits"], dtype=torch.float64) - expected).abs().max() / expected.abs().max()
    lines += [
        "",
        f"fused/literal peak memory: {_ratio(fused['peak_mib'], literal['peak_mib'], 3)}x",
        *([f"fused/literal tensor peak memory: {_ratio(fused['tensor_peak_mib'], literal['tensor_peak_mib'], 3)}x"]
          if args.device == "cpu" else []),
        f"fused vs literal time: {_ratio(literal['ms'], fused['ms'], 1)}x faster",
        f"logits, max |fused - literal| / max |literal|: {gap:.1e}",
        f"- raw ms per step, round by round: literal {_join(literal['times_ms'])}; fused {_join(fused['times_ms'])}",
        f"- load average (1/5/15 min) at end: {_load()}",
    ]
    if not (literal["peak_resettable"] and fused["peak_resettable"]):
        lines.append("- WARNING: the peak RSS could not be reset; peaks are running maxima since the inputs were built")
    return "\n".join(lines)


def _ratio(numerator: float | None, denominator: float | None, digits: int) -> str:
    if numerator is None or not denominator or denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.{digits}f}"


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def _memory_words(device: str) -> str:
    if device == "cuda":
        return ("torch.cuda.max_memory_allocated during a step minus memory_allocated just before it "
                "(inputs, weights and upstream gradient excluded); peak = max over the timed steps")
    return ("growth of resident memory during a step: peak RSS (VmHWM of /proc/self/status, reset through "
            "/proc/self/clear_refs before each step, after malloc_trim) minus the RSS (VmRSS) just before it, "
            "so inputs, weights and the upstream gradient are excluded; the gradients of x and the CAMs, "
            "every temporary and the allocator's overhead are included; peak = max over the timed steps. "
            "tensor peak: the most tensor bytes live at once during one extra step, summed from "
            "torch.profiler's allocation events (no allocator overhead)")


def _join(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch", type=int, default=0, help="0: 8 on the CPU, 32 on CUDA")
    parser.add_argument("--channels", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="h = w of the feature map (512 px / 16)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per variant, alternating")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0: torch's default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    args.batch = args.batch or (32 if args.device == "cuda" else 8)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = Shape(args.batch, args.channels, args.classes, args.size)
    if args.worker:
        result = measure(args.worker, shape, torch.device(args.device), args.warmup, args.repeats, args.seed)
        print(json.dumps(result))
        return
    args.load_at_start = _load()
    rounds: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for index in range(args.rounds):  # alternate the variants, so drift in the machine's load hits both
        for variant in VARIANTS:
            print(f"round {index + 1}/{args.rounds}: measuring {variant} ...", file=sys.stderr, flush=True)
            rounds[variant].append(spawn(variant, args))
    print(report({variant: merge_rounds(results) for variant, results in rounds.items()}, shape, args))


def merge_rounds(results: list[dict]) -> dict:
    """One variant over all its processes: every timed step, the largest peaks, the first logits."""
    times = [t for result in results for t in result["times_ms"]]
    median = statistics.median(times)
    tensor_peaks = [r["tensor_peak_mib"] for r in results if r["tensor_peak_mib"] is not None]
    return {
        **results[0], "times_ms": times, "ms": median, "spread": (max(times) - min(times)) / median,
        "peak_mib": max(r["peak_mib"] for r in results),
        "first_step_mib": max(r["first_step_mib"] for r in results),
        "tensor_peak_mib": max(tensor_peaks) if tensor_peaks else None,
        "peak_resettable": all(r["peak_resettable"] for r in results),
    }


if __name__ == "__main__":
    main()
