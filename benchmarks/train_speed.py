"""Speed of one training iteration for every keypoint strategy, measured with the trainer's own step.

    python benchmarks/train_speed.py                      # demo recipe: resnet18, 128 px, batch 16, demo data
    python benchmarks/train_speed.py --device cuda --architecture resnet50 --image_size 512 --batch_size 32
    python benchmarks/train_speed.py --device cuda --compare_amp   # fp32 vs bf16 + channels_last

One iteration = forward_losses + backward + optimizer step + EMA teacher update, called exactly as
core/trainer.py's loop calls them (accum_steps = 1). Every strategy gets the same pre-loaded
batches and the same initial weights; strategies are interleaved round-robin inside each repeat
and the median over repeats is reported, so drift on a shared machine hits all of them alike.
Flags this script does not know are passed on to the trainer's parser (e.g. --patch_chunk 8, --k 3).
See benchmarks/README.md for the columns and the FLOP-based ideal ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import importlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/train_speed.py` from any folder
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from core.config import DEMO_DEFAULTS, parse_args  # noqa: E402
from core.data import EpochBatchSampler  # noqa: E402
from core.runtime import Runtime, setup_runtime  # noqa: E402
from core.step import StepContext, build_step, train_step  # noqa: E402
from core.strategies import STRATEGIES  # noqa: E402
from tools.augment import TrainTransform  # noqa: E402
from tools.demo_data import default_demo_root, generate_demo_dataset  # noqa: E402
from tools.errors import UserError, run_cli  # noqa: E402
from tools.voc import NUM_CLASSES, VOCClassification, load_split  # noqa: E402

# The script whose DEFAULTS (loss weights) each strategy trains with.
STRATEGY_SCRIPTS = {
    "none": "train_classification",
    "puzzle": "train_classification_with_puzzle",
    "max": "train_classification_with_puzzle_max",
    "cmax": "train_classification_with_puzzle_cMax_ema",
    "ctopk": "train_classification_with_puzzle_cTopk_ema",
    "ctopk_w": "train_classification_with_puzzle_cTopk_w_ema",
}
MIB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Variant:
    """Numerics of one set of runs: autocast dtype and memory format."""

    amp: str  # off | bf16 | fp16
    channels_last: bool

    @property
    def label(self) -> str:
        name = "fp32" if self.amp == "off" else self.amp
        return f"{name}+channels_last" if self.channels_last else name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other flag goes to the trainer's parser (core/config.py), "
                                       "e.g. --patch_chunk 8 --k 3 --patch_network student.")
    a = p.add_argument
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--architecture", default=DEMO_DEFAULTS["architecture"])
    a("--mode", default=DEMO_DEFAULTS["mode"], help="BatchNorm mode: normal | fix")
    a("--pretrained", default=DEMO_DEFAULTS["pretrained"], help="none | imagenet | PATH (speed does not depend on it)")
    a("--image_size", type=int, default=DEMO_DEFAULTS["image_size"])
    a("--batch_size", type=int, default=DEMO_DEFAULTS["batch_size"])
    a("--iterations", type=int, default=10, help="timed iterations per strategy and repeat")
    a("--warmup", type=int, default=2, help="untimed iterations before each timed block")
    a("--repeats", type=int, default=3, help="round-robin passes over the strategies; the median is reported")
    a("--strategies", default=",".join(STRATEGIES), help="comma-separated subset of " + ",".join(STRATEGIES))
    a("--amp", default="off", choices=["off", "bf16", "fp16"])
    a("--channels_last", default="auto", choices=["auto", "on", "off"],
      help="auto: on for CUDA (what the trainer does), off on the CPU")
    a("--data", default="demo", choices=["demo", "random"],
      help="demo: real augmented batches of the generated demo set; random: noise images, 1-4 labels each")
    a("--compare_amp", action="store_true",
      help="run every strategy in fp32 and in bf16+channels_last and print the speed-up (meant for CUDA)")
    a("--format", default="markdown", choices=["markdown", "text"])
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, as the trainer uses)")
    return p


def check_options(opts: argparse.Namespace) -> list[str]:
    """Validate the benchmark's own flags; return the strategy names in the order given."""
    for name in ("iterations", "repeats", "batch_size"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.threads < 0:
        raise UserError(f"--threads must not be negative, got {opts.threads}")
    if opts.warmup < 0:
        raise UserError(f"--warmup must not be negative, got {opts.warmup}")
    names = list(dict.fromkeys(s.strip() for s in opts.strategies.split(",") if s.strip()))
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise UserError(f"--strategies: unknown {unknown or 'empty list'}; choose from {', '.join(STRATEGIES)}")
    return names


def variants_of(opts: argparse.Namespace, device: torch.device) -> list[Variant]:
    if opts.compare_amp:
        return [Variant("off", False), Variant("bf16", True)]
    channels_last = {"on": True, "off": False, "auto": device.type == "cuda"}[opts.channels_last]
    return [Variant(opts.amp, channels_last)]


def trainer_args(strategy: str, opts: argparse.Namespace, variant: Variant, extra: list[str]) -> argparse.Namespace:
    """The strategy's training config: its script's defaults + the demo recipe + our flags (+ pass-through)."""
    defaults = dict(importlib.import_module(STRATEGY_SCRIPTS[strategy]).DEFAULTS)
    argv = ["--demo", "--strategy", strategy, "--device", opts.device, "--architecture", opts.architecture,
            "--mode", opts.mode, "--pretrained", opts.pretrained, "--image_size", str(opts.image_size),
            "--batch_size", str(opts.batch_size), "--amp", variant.amp, "--seed", str(opts.seed),
            "--num_workers", "0", *extra]
    args = parse_args(defaults, argv)
    if args.accum_steps != 1:
        raise UserError("--accum_steps: the benchmark times whole optimizer steps of one micro-batch; drop the flag")
    return args


# ----------------------------------------------------------------------------- data
@dataclass
class Batch:
    images: torch.Tensor  # on the device
    labels: torch.Tensor  # on the device
    labels_cpu: torch.Tensor


def demo_batches(count: int, args: argparse.Namespace) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """The first `count` training batches the trainer would draw from the demo set (seed, epochs 0, 1, ...)."""
    root = generate_demo_dataset(default_demo_root())
    split = load_split(root, args.train_split)
    dataset = VOCClassification(root, split, TrainTransform(args.image_size, args.min_image_size,
                                                            args.max_image_size))
    sampler = EpochBatchSampler(len(dataset), args.batch_size, args.seed)
    if sampler.iterations_per_epoch < 1:
        raise UserError(f"the demo split has {len(dataset)} images, fewer than --batch_size {args.batch_size}")
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = 0
    while len(batches) < count:
        sampler.set_epoch(epoch)
        for keys in sampler:
            samples = [dataset[key] for key in keys]
            batches.append((torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])))
            if len(batches) == count:
                break
        epoch += 1
    source = (f"demo ({len(dataset)} images of {args.train_split} at {root}; long side {args.min_image_size}-"
              f"{args.max_image_size}, crop {args.image_size})")
    return batches, source


def random_labels(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """1-4 distinct classes per image, the count uniform like the demo set's drawing."""
    labels = torch.zeros(batch_size, NUM_CLASSES)
    for row in labels:
        count = int(torch.randint(1, 5, (1,), generator=generator))
        row[torch.randperm(NUM_CLASSES, generator=generator)[:count]] = 1.0
    return labels


def random_batches(count: int, batch_size: int, image_size: int,
                   seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(batch_size, 3, image_size, image_size, generator=generator),
                random_labels(batch_size, generator)) for _ in range(count)]
    return batches, "random (N(0,1) images, 1-4 random classes per image)"


def load_batches(opts: argparse.Namespace, args: argparse.Namespace,
                 device: torch.device) -> tuple[list[Batch], str]:
    """Pre-load every timed batch on the device once: no data loading or host-to-device copy is timed."""
    if opts.data == "demo":
        cpu_batches, source = demo_batches(opts.iterations, args)
    else:
        cpu_batches, source = random_batches(opts.iterations, opts.batch_size, opts.image_size, opts.seed)
    return [Batch(images.to(device), labels.to(device), labels) for images, labels in cpu_batches], source


# ----------------------------------------------------------------------------- memory
def _rss_peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _rss_now_mib() -> float:
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return _rss_peak_mib()
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the OS, so a strategy's peak does not include the last one's cache."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (what getrusage's ru_maxrss reads)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory of one timed block: RSS on the CPU, allocated CUDA memory on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = True
        self.base = 0.0

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset before each block"
        if self.resettable:
            return "process peak RSS (getrusage ru_maxrss), reset before each block via /proc/self/clear_refs"
        return "process peak RSS (getrusage ru_maxrss); it could NOT be reset here, so it is the running maximum"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / MIB
            return
        _malloc_trim()
        self.resettable = _reset_rss_peak() and self.resettable
        self.base = _rss_now_mib()

    def read(self) -> tuple[float, float]:
        """(peak MiB, peak minus the level at start(): what the iteration itself added)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
        else:
            peak = _rss_peak_mib()
        return peak, max(peak - self.base, 0.0)


# ----------------------------------------------------------------------------- one strategy's training state
@dataclass
class Run:
    """Everything core.trainer.train builds for one strategy, plus the measurements."""

    variant: Variant
    name: str
    args: argparse.Namespace
    ctx: StepContext
    student: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    base_lrs: list[float]
    window: torch.Tensor  # summed stats, as the trainer's log window
    bad: torch.Tensor  # first non-finite step, as the trainer's
    total: int  # iterations of the schedule (lr poly, alpha_re ramp)
    step: int = 0
    images_seen: int = 0
    seconds: list[float] = field(default_factory=list)  # seconds per iteration, one per repeat
    peak_mib: float = 0.0
    added_mib: float = 0.0


def build_run(name: str, variant: Variant, args: argparse.Namespace, runtime: Runtime, total: int) -> Run:
    """Model, teacher, optimizer and scaler of one strategy, built by the trainer's own build_step."""
    torch.manual_seed(args.seed)  # every strategy starts from the same weights
    ctx = build_step(args, runtime)
    if variant.channels_last != ctx.channels_last:
        layout = torch.channels_last if variant.channels_last else torch.contiguous_format
        for network in (ctx.student, ctx.teacher):
            if network is not None:
                network.to(memory_format=layout)
        ctx.channels_last = variant.channels_last
    ctx.student.train()
    return Run(variant, name, args, ctx, ctx.bare_student, ctx.bare_teacher, ctx.optimizer, ctx.scaler, ctx.base_lrs,
               torch.zeros(6, device=runtime.device), torch.full((7,), -1.0, device=runtime.device), total)


def train_iteration(run: Run, batch: Batch) -> None:
    """One optimizer step: core.trainer.train_step, as the training loop calls it (accum_steps = 1)."""
    stats = train_step(run.ctx, [(batch.images, batch.labels_cpu)], run.step, run.total)
    run.window += stats
    first_bad = ~torch.isfinite(stats[:4]).all() & (run.bad[0] < 0)
    run.bad.copy_(torch.where(first_bad, torch.cat([stats.new_full((1,), run.step), stats]), run.bad))
    run.step += 1
    run.images_seen += batch.images.shape[0]


# ----------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(run: Run, batches: list[Batch], warmup: int, probe: MemoryProbe, device: torch.device) -> None:
    """Warm up (untimed, re-fills caches after the previous strategy), then time len(batches) iterations."""
    probe.start()
    for i in range(warmup):
        train_iteration(run, batches[i % len(batches)])
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        train_iteration(run, batch)
    synchronize(device)
    run.seconds.append((time.perf_counter() - start) / len(batches))
    peak, added = probe.read()
    run.peak_mib, run.added_mib = max(run.peak_mib, peak), max(run.added_mib, added)


def prime(runs: list[Run], batches: list[Batch], warmup: int) -> None:
    """Untimed steps on every freshly built run first: its first iterations pay one-off costs
    (first-touch memory, oneDNN primitives for new shapes, optimizer state) that are no part of training speed.
    """
    for run in runs:
        for i in range(max(warmup, 1)):
            train_iteration(run, batches[i % len(batches)])


def benchmark(runs: list[Run], batches: list[Batch], opts: argparse.Namespace, probe: MemoryProbe,
              device: torch.device, progress: Callable[[str], None]) -> None:
    """Round-robin: every repeat times every run once, starting one run later each time (no fixed position)."""
    prime(runs, batches, opts.warmup)
    for repeat in range(opts.repeats):
        shift = repeat % len(runs)
        for run in runs[shift:] + runs[:shift]:
            time_block(run, batches, opts.warmup, probe, device)
            progress(f"repeat {repeat + 1}/{opts.repeats} {run.variant.label:>20} {run.name:>8}: "
                     f"{1000 * run.seconds[-1]:.1f} ms/it")


# ----------------------------------------------------------------------------- results
def tasks_per_image(run: Run) -> float:
    return float(run.window[4]) / max(run.images_seen, 1)


def ideal_cost(run: Run) -> float:
    """Iteration cost in units of F (one forward of one image) from FLOPs alone.

    Forward + backward of the full image: 3F. The four half-size tiles of a task hold as many pixels
    as the image (F per task): 3F per task when they go through the student (with backward), F when
    through the EMA teacher (forward only). T tasks per image: 3 + 3T (student) or 3 + T (teacher).
    """
    if not STRATEGIES[run.name].puzzle:
        return 3.0
    per_task = 3.0 if run.args.patch_network == "student" else 1.0
    return 3.0 + per_task * tasks_per_image(run)


def median_seconds(run: Run) -> float:
    return statistics.median(run.seconds)


def ratio_cells(run: Run, reference: Run | None) -> list[str]:
    """Measured time ratio, ideal FLOP ratio and the deviation of measured from ideal, in %."""
    if reference is None:
        return ["n/a", "n/a", "n/a"]
    measured = median_seconds(run) / median_seconds(reference)
    ideal = ideal_cost(run) / ideal_cost(reference)
    return [f"{measured:.2f}", f"{ideal:.2f}", f"{100 * (measured / ideal - 1):+.0f}%"]


HEADER = ["strategy", "ms/it", "spread", "it/s", "img/s", "T", "peak MiB", "step MiB",
          "t/none", "ideal/none", "dev/none", "t/puzzle", "ideal/puzzle", "dev/puzzle"]


def result_rows(runs: list[Run], batch_size: int) -> list[list[str]]:
    by_name = {run.name: run for run in runs}
    rows = []
    for run in runs:
        seconds = median_seconds(run)
        spread = (max(run.seconds) - min(run.seconds)) / seconds
        rows.append([run.name, f"{1000 * seconds:.1f}", f"{100 * spread:.0f}%", f"{1 / seconds:.3g}",
                     f"{batch_size / seconds:.1f}", f"{tasks_per_image(run):.2f}", f"{run.peak_mib:.0f}",
                     f"{run.added_mib:.0f}", *ratio_cells(run, by_name.get("none")),
                     *ratio_cells(run, by_name.get("puzzle"))])
    return rows


def speedup_rows(runs: list[Run], variants: list[Variant]) -> list[list[str]]:
    """Per strategy: time in the first variant (fp32) over time in the second (bf16 + channels_last)."""
    slow = {run.name: run for run in runs if run.variant == variants[0]}
    fast = {run.name: run for run in runs if run.variant == variants[1]}
    return [[name, f"{1000 * median_seconds(slow[name]):.1f}", f"{1000 * median_seconds(fast[name]):.1f}",
             f"{median_seconds(slow[name]) / median_seconds(fast[name]):.2f}x"] for name in slow]


def format_table(header: list[str], rows: list[list[str]], style: str) -> str:
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header)))
                 + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header, *rows])


def raw_lines(runs: list[Run]) -> list[str]:
    return [f"{run.variant.label} {run.name}: " + ", ".join(f"{1000 * s:.1f}" for s in run.seconds) + " ms/it"
            for run in runs]


def warnings_for(runs: list[Run]) -> list[str]:
    """A diverged run still times the same work, but say so: NaNs can change kernel speed (denormals)."""
    out = []
    for run in runs:
        if float(run.bad[0]) >= 0:
            out.append(f"warning: {run.variant.label} {run.name} had a non-finite loss from step {int(run.bad[0])}")
    return out


# ----------------------------------------------------------------------------- description
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host CPU {cpu_model()}"
    return f"{cpu_model()}, {os.cpu_count()} logical CPUs visible"


def load_average() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def describe(opts: argparse.Namespace, args: argparse.Namespace, device: torch.device, source: str,
             extra: list[str], variants: list[Variant]) -> list[str]:
    config = (f"architecture={args.architecture} mode={args.mode} pretrained={args.pretrained} "
              f"image_size={args.image_size} batch_size={args.batch_size} iterations={opts.iterations} "
              f"warmup={opts.warmup} repeats={opts.repeats} seed={opts.seed} "
              f"variants={','.join(v.label for v in variants)} k={args.k} min_distance={args.min_distance} "
              f"patch_chunk={args.patch_chunk}")
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"command: {' '.join([Path(sys.executable).name, *sys.argv])}",
        f"machine: {machine_line(device)}; {platform.platform()}",
        f"device: {device}",
        f"torch: {torch.__version__}, intra-op threads {torch.get_num_threads()}, "
        f"inter-op threads {torch.get_num_interop_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        f"load average (1/5/15 min) at start: {load_average()}",
        f"config: {config}",
        f"data: {source}",
        f"passed to the trainer's parser: {' '.join(extra) if extra else '(nothing)'}",
    ]


def print_block(lines: list[str], style: str) -> None:
    for line in lines:
        print(f"- {line}" if style == "markdown" else line)


def report(runs: list[Run], variants: list[Variant], opts: argparse.Namespace, probe: MemoryProbe) -> None:
    for variant in variants:
        rows = result_rows([run for run in runs if run.variant == variant], opts.batch_size)
        print(f"\n## {variant.label}\n" if opts.format == "markdown" else f"\n[{variant.label}]")
        print(format_table(HEADER, rows, opts.format))
    if len(variants) == 2:
        print(f"\n## speed-up {variants[0].label} -> {variants[1].label}\n" if opts.format == "markdown"
              else f"\n[speed-up {variants[0].label} -> {variants[1].label}]")
        header = ["strategy", f"{variants[0].label} ms/it", f"{variants[1].label} ms/it", "speed-up"]
        print(format_table(header, speedup_rows(runs, variants), opts.format))
    print()
    notes = [f"ms/it: median over {opts.repeats} repeats of the mean of {opts.iterations} timed iterations; "
             "spread = (max - min) / median over the repeats",
             "T: puzzle tasks per image, measured; ideal cost in F: none 3, student tiles 3 + 3T, "
             "EMA-teacher tiles 3 + T; dev = measured / ideal - 1",
             f"memory: {probe.description}; step MiB = peak minus the level before the block",
             f"load average (1/5/15 min) at end: {load_average()}",
             "raw ms/it per repeat: " + "; ".join(raw_lines(runs)), *warnings_for(runs)]
    print_block(notes, opts.format)


# ----------------------------------------------------------------------------- main
def progress_printer(enabled: bool) -> Callable[[str], None]:
    """Progress goes to stderr, so stdout holds only the report."""
    def emit(line: str) -> None:
        if enabled:
            print(line, file=sys.stderr, flush=True)
    return emit


def main(argv: list[str] | None = None) -> None:
    opts, extra = build_parser().parse_known_args(argv)
    names = check_options(opts)
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    probe_args = trainer_args(names[0], opts, Variant(opts.amp, False), extra)
    runtime = setup_runtime(probe_args)  # resolves --device auto and rejects fp16 on the CPU, like the trainer
    variants = variants_of(opts, runtime.device)
    if runtime.device.type == "cuda" and opts.compare_amp and not torch.cuda.is_bf16_supported():
        raise UserError("--compare_amp needs a GPU with bf16 support")
    torch.manual_seed(opts.seed)
    batches, source = load_batches(opts, probe_args, runtime.device)
    total = max(opts.warmup, 1) + opts.repeats * (opts.warmup + opts.iterations)  # every step of a run
    runs = [build_run(name, variant, trainer_args(name, opts, variant, extra), runtime, total)
            for variant in variants for name in names]
    print("# OASS training-iteration benchmark" + ("\n" if opts.format == "markdown" else ""))
    print_block(describe(opts, probe_args, runtime.device, source, extra, variants), opts.format)
    sys.stdout.flush()
    probe = MemoryProbe(runtime.device)
    benchmark(runs, batches, opts, probe, runtime.device, progress_printer(True))
    report(runs, variants, opts, probe)


if __name__ == "__main__":
    run_cli(main)
