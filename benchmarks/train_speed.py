"""Speed of one training iteration per keypoint strategy, and of cTopk-w against a per-task loop.

    python benchmarks/train_speed.py                                  # demo recipe: resnet18, 112 px, batch 16
    python benchmarks/train_speed.py --configs demo,r50_256 --strategies ctopk_w
    python benchmarks/train_speed.py --patch_chunks auto,0 --channels_last off,on --strategies ctopk_w
    python benchmarks/train_speed.py --device cuda --configs r50_512 --amp off,bf16

One iteration is core.step.train_step, as the training loop calls it (accum_steps 1), on models,
teacher and optimiser built by core.step.build_step and batches drawn by the trainer's own
sampler and dataset (core.data.build_data). With cTopk-w among the strategies, the per-task loop of
benchmarks/per_task_loop.py (the official scripts' structure: numpy/scikit-image keypoints, one
teacher call per task) runs beside it from the same weights and batches. All runs of a
configuration are interleaved round-robin within each repeat; the median over repeats is reported.
Flags this script does not know go to the trainer's parser (e.g. --k 3 --reference_gpus 1).
See benchmarks/README.md for the columns, the FLOP-based ideal ratios and measured tables.
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/train_speed.py` from any folder
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.measure import (  # noqa: E402
    MemoryProbe,
    format_table,
    load_average,
    machine_lines,
    print_block,
    synchronize,
)
from benchmarks.per_task_loop import per_task_step  # noqa: E402
from core.config import parse_args  # noqa: E402
from core.data import build_data  # noqa: E402
from core.runtime import Runtime, setup_runtime  # noqa: E402
from core.step import StepContext, build_step, train_step  # noqa: E402
from core.strategies import STRATEGIES  # noqa: E402
from tools.augment import PackedImages  # noqa: E402
from tools.errors import UserError, run_cli  # noqa: E402

# The script whose DEFAULTS (loss weights) each strategy trains with.
STRATEGY_SCRIPTS = {
    "none": "train_classification", "puzzle": "train_classification_with_puzzle",
    "max": "train_classification_with_puzzle_max", "cmax": "train_classification_with_puzzle_cMax_ema",
    "ctopk": "train_classification_with_puzzle_cTopk_ema", "ctopk_w": "train_classification_with_puzzle_cTopk_w_ema",
}
# Named configurations; "demo" is the --demo recipe's network, crop and batch. The augmentation's resize range
# scales with the crop (3/4 to 5/4 of it).
CONFIGS = {
    "demo": {"architecture": "resnet18", "image_size": 112, "batch_size": 16},
    "r50_256": {"architecture": "resnet50", "image_size": 256, "batch_size": 8},
    "r50_512": {"architecture": "resnet50", "image_size": 512, "batch_size": 32},
}
PER_TASK = "per-task"


@dataclass(frozen=True)
class Variant:
    """Numerics and batching of a set of runs: autocast, memory format, --patch_chunk."""

    amp: str
    channels_last: str  # auto (the trainer's choice) | on | off
    patch_chunk: str

    @property
    def label(self) -> str:
        return f"amp {self.amp}, channels_last {self.channels_last}, patch_chunk {self.patch_chunk}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other flag goes to the trainer's parser (core/config.py).")
    a = p.add_argument
    a("--configs", default="demo", help="comma-separated: " + ", ".join(f"{k} {v}" for k, v in CONFIGS.items()))
    a("--architecture", default=None, help="overrides every config's")
    a("--image_size", type=int, default=None, help="overrides every config's")
    a("--batch_size", type=int, default=None, help="overrides every config's")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--mode", default="normal", help="BatchNorm mode: normal | fix")
    # default: the built-in strategies, whose scripts (loss weights) STRATEGY_SCRIPTS knows
    a("--strategies", default=",".join(STRATEGY_SCRIPTS), help="comma-separated subset of " + ",".join(STRATEGIES))
    a("--per_task_loop", default="on", choices=["on", "off"], help="time the per-task loop beside ctopk_w")
    a("--amp", default="off", help="comma-separated: off | bf16 | fp16 (each a variant)")
    a("--channels_last", default="auto", help="comma-separated: auto (the trainer's choice) | on | off")
    a("--patch_chunks", default="auto", help="comma-separated --patch_chunk values (each a variant)")
    a("--data", default="demo", choices=["demo", "random"],
      help="demo: the trainer's augmented batches of the demo set; random: noise images, 1-4 labels each")
    a("--iterations", type=int, default=10, help="timed iterations per run and repeat")
    a("--warmup", type=int, default=2, help="untimed iterations before each timed block")
    a("--repeats", type=int, default=3, help="round-robin passes over the runs; the median is reported")
    a("--format", default="markdown", choices=["markdown", "text"])
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, as the trainer uses)")
    return p


def split_list(text: str, flag: str, allowed: list[str] | None = None) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in names if allowed is not None and s not in allowed]
    if unknown or not names:
        raise UserError(f"{flag}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed or [])}")
    return names


def check_options(opts: argparse.Namespace) -> None:
    for name in ("iterations", "repeats"):
        if getattr(opts, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(opts, name)}")
    if opts.warmup < 0 or opts.threads < 0:
        raise UserError("--warmup and --threads must not be negative")


def config_flags(name: str, opts: argparse.Namespace) -> list[str]:
    config = dict(CONFIGS[name])
    config.update({k: getattr(opts, k) for k in config if getattr(opts, k) is not None})
    size = config["image_size"]
    return [f"--{k}={v}" for k, v in config.items()] + [f"--min_image_size={size * 3 // 4}",
                                                         f"--max_image_size={size * 5 // 4}"]


def trainer_args(strategy: str, flags: list[str], opts: argparse.Namespace, variant: Variant,
                 extra: list[str]) -> argparse.Namespace:
    """The strategy's training config: its script's defaults + the demo recipe + the config (+ pass-through)."""
    # a plug-in strategy (strategies/) trains with the OASS scripts' loss weights
    script = STRATEGY_SCRIPTS.get(strategy, STRATEGY_SCRIPTS["ctopk_w"])
    defaults = dict(importlib.import_module(script).DEFAULTS)
    argv = ["--demo", "--strategy", strategy, "--device", opts.device, "--mode", opts.mode, "--amp", variant.amp,
            "--patch_chunk", variant.patch_chunk, "--seed", str(opts.seed), "--num_workers", "0", *flags, *extra]
    args = parse_args(defaults, argv)
    if args.accum_steps != 1:
        raise UserError("--accum_steps: the benchmark times whole optimizer steps of one micro-batch; drop the flag")
    return args


# ----------------------------------------------------------------------------- batches
def demo_batches(count: int, args: argparse.Namespace, runtime: Runtime) -> tuple[list, str]:
    """The first `count` batches the trainer draws (its dataset, sampler and loader; epochs 0, 1, ...)."""
    data = build_data(args, runtime)
    batches: list = []
    for epoch in itertools.count():
        data.sampler.set_epoch(epoch)
        batches += [item[:2] for _, item in zip(range(count - len(batches)), data.loader)]
        if len(batches) == count:
            return batches, f"demo ({len(data.train_set)} images of {data.facts['train_split']} at {data.root})"


def random_batches(count: int, args: argparse.Namespace, seed: int) -> tuple[list, str]:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        labels = torch.zeros(args.batch_size, 20)
        for row in labels:  # 1-4 distinct classes per image, like the demo set's drawing
            row[torch.randperm(20, generator=gen)[:int(torch.randint(1, 5, (1,), generator=gen))]] = 1.0
        batches.append((torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen), labels))
    return batches, "random (N(0,1) images, 1-4 random classes per image)"


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    name: str  # a strategy, or PER_TASK
    variant: Variant
    ctx: StepContext
    total: int  # iterations of the schedule (poly lr, alpha_re ramp)
    step: int = 0
    images: int = 0
    window: torch.Tensor | float = 0.0  # summed [loss, class, p_class, re, tasks], kept on the device: no sync
    seconds: list[float] = field(default_factory=list)  # wall-clock per iteration, one per repeat
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time (all threads) per iteration
    peak_mib: float = 0.0
    added_mib: float = 0.0

    def iterate(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if self.name == PER_TASK:
            stats = per_task_step(self.ctx, images, labels, self.step, self.total)
        else:
            stats = train_step(self.ctx, [(images, labels)], self.step, self.total)
        self.window = self.window + stats[:5]
        self.step, self.images = self.step + 1, self.images + labels.shape[0]  # images: maybe packed uint8

    @property
    def tasks_per_image(self) -> float:
        return float(self.window[4]) / max(self.images, 1)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)


def build_run(name: str, variant: Variant, args: argparse.Namespace, runtime: Runtime, total: int,
              num_classes: int) -> Run:
    torch.manual_seed(args.seed)  # every run starts from the same weights
    ctx = build_step(args, runtime, num_classes)
    if variant.channels_last != "auto":
        ctx.channels_last = variant.channels_last == "on"
        for network in (ctx.student, ctx.teacher):
            if network is not None:
                network.to(memory_format=torch.channels_last if ctx.channels_last else torch.contiguous_format)
    ctx.student.train()
    return Run(name, variant, ctx, total)


def benchmark(runs: list[Run], batches: list, opts: argparse.Namespace, probe: MemoryProbe,
              device: torch.device) -> None:
    """Untimed priming steps, then round-robin repeats: each times every run once, the start rotating."""
    for run in runs:  # one-off costs: first-touch memory, oneDNN primitives for new shapes, optimiser state
        for i in range(max(opts.warmup, 1)):
            run.iterate(*batches[i % len(batches)])
    for repeat in range(opts.repeats):
        shift = repeat % len(runs)
        for run in runs[shift:] + runs[:shift]:
            probe.start()
            for i in range(opts.warmup):
                run.iterate(*batches[i % len(batches)])
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for images, labels in batches:
                run.iterate(images, labels)
            synchronize(device)
            run.seconds.append((time.perf_counter() - start) / len(batches))
            run.cpu_seconds.append((time.process_time() - start_cpu) / len(batches))
            peak, added = probe.read()
            run.peak_mib, run.added_mib = max(run.peak_mib, peak), max(run.added_mib, added)
            print(f"repeat {repeat + 1}/{opts.repeats} {run.name:>8} ({run.variant.label}): "
                  f"{1000 * run.seconds[-1]:.1f} ms/it", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- report
def ideal_cost(run: Run) -> float:
    """Iteration cost in units of F (one forward of one image) from FLOPs alone: the full image's
    forward + backward 3F; a task's four half-size tiles hold the image's pixels, F forward, 3F with
    backward. T tasks per image: 3 + 3T (student tiles) or 3 + T (EMA teacher)."""
    if not run.ctx.strategy.puzzle:
        return 3.0
    return 3.0 + (3.0 if run.ctx.args.patch_network == "student" else 1.0) * run.tasks_per_image


def ratio_cells(run: Run, reference: Run | None) -> list[str]:
    """Measured time ratio, ideal FLOP ratio and the deviation of measured from ideal, in %."""
    if reference is None:
        return ["n/a", "n/a", "n/a"]
    measured, ideal = run.median / reference.median, ideal_cost(run) / ideal_cost(reference)
    return [f"{measured:.2f}", f"{ideal:.2f}", f"{100 * (measured / ideal - 1):+.0f}%"]


HEADER = ["strategy", "ms/it", "spread", "CPU ms/it", "it/s", "img/s", "T", "peak MiB", "step MiB",
          "t/none", "ideal/none", "dev/none", "t/puzzle", "ideal/puzzle", "dev/puzzle"]


def result_rows(runs: list[Run], batch_size: int) -> list[list[str]]:
    by_name = {run.name: run for run in runs}
    return [[run.name, f"{1000 * run.median:.1f}", f"{100 * (max(run.seconds) - min(run.seconds)) / run.median:.0f}%",
             f"{1000 * run.cpu_median:.1f}", f"{1 / run.median:.3g}", f"{batch_size / run.median:.1f}",
             f"{run.tasks_per_image:.2f}", f"{run.peak_mib:.0f}", f"{run.added_mib:.0f}",
             *ratio_cells(run, by_name.get("none")), *ratio_cells(run, by_name.get("puzzle"))] for run in runs]


def per_task_line(runs: list[Run], cpu: bool = False) -> str | None:
    """The cTopk-w run of the first variant against the per-task loop, in the issue's one-line form
    (wall-clock), or the same from process CPU time (`cpu`: robust to a machine shared with other jobs)."""
    first = [run for run in runs if run.variant == runs[0].variant]
    ours = next((run for run in first if run.name == "ctopk_w"), None)
    theirs = next((run for run in first if run.name == PER_TASK), None)
    if ours is None or theirs is None:
        return None
    a, b = (ours.cpu_median, theirs.cpu_median) if cpu else (ours.median, theirs.median)
    what = "CPU time" if cpu else "s/it"
    return f"ctopk_w vs per-task loop: {b / a:.2f}x (ours {a:.2f} {what}, per-task {b:.2f} {what})"


def report(config: str, runs: list[Run], args: argparse.Namespace, opts: argparse.Namespace,
           probe: MemoryProbe, source: str) -> None:
    style = opts.format
    print(f"\n## {config}\n" if style == "markdown" else f"\n[{config}]")
    print_block([f"config: architecture={args.architecture} image_size={args.image_size} batch_size={args.batch_size} "
                 f"mode={args.mode} reference_gpus={args.reference_gpus} k={args.k} "
                 f"min_distance={args.min_distance} iterations={opts.iterations} warmup={opts.warmup} "
                 f"repeats={opts.repeats} seed={opts.seed}", f"data: {source}",
                 "heads (each strategy's script default): " + ", ".join(
                     dict.fromkeys(f"{r.name} {r.ctx.args.head}" for r in runs))], style)
    for variant in dict.fromkeys(run.variant for run in runs):
        print(f"\n### {variant.label}\n" if style == "markdown" else f"\n[{variant.label}]")
        print(format_table(HEADER, result_rows([r for r in runs if r.variant == variant], args.batch_size), style))
    print()
    print_block([f"ms/it: median over {opts.repeats} repeats of the mean of {opts.iterations} timed iterations; "
                 "spread = (max - min) / median over the repeats; CPU ms/it: the same from the process's CPU time",
                 *([f"CPU time, {per_task_line(runs, cpu=True)}"] if per_task_line(runs) else []),
                 f"memory: {probe.description}; step MiB = peak minus the level before the block",
                 f"load average (1/5/15 min) at end: {load_average()}",
                 "raw ms/it per repeat: " + "; ".join(
                     f"{r.name} ({r.variant.label}): " + ", ".join(f"{1000 * s:.1f}" for s in r.seconds) for r in runs),
                 *[f"warning: {r.name} ({r.variant.label}) had a non-finite loss" for r in runs
                   if not bool(torch.isfinite(r.window[:4]).all())]], style)


# ----------------------------------------------------------------------------- main
def run_config(config: str, names: list[str], variants: list[Variant], opts: argparse.Namespace,
               extra: list[str]) -> str | None:
    """Build, time and report every run of one configuration; returns its per-task ratio line."""
    flags = config_flags(config, opts)
    first = trainer_args(names[0], flags, opts, variants[0], extra)
    runtime = setup_runtime(first)  # resolves --device auto, rejects fp16 on the CPU, like the trainer
    torch.manual_seed(opts.seed)
    if opts.data == "demo":
        batches, source = demo_batches(opts.iterations, first, runtime)
    else:
        batches, source = random_batches(opts.iterations, first, opts.seed)
    # no copy is timed; the loader's uint8 batches are normalised inside the step, as in training
    batches = [(type(images)(*(t.to(runtime.device) for t in images)) if isinstance(images, PackedImages)
                else images.to(runtime.device), labels) for images, labels in batches]
    total = max(opts.warmup, 1) + opts.repeats * (opts.warmup + opts.iterations)
    runs, num_classes = [], batches[0][1].shape[1]  # the head's size from the data, as the trainer
    for variant in variants:
        for name in names:
            kinds = [name] + ([PER_TASK] if name == "ctopk_w" and opts.per_task_loop == "on" and
                              variant == variants[0] else [])
            runs += [build_run(kind, variant, trainer_args(name, flags, opts, variant, extra), runtime, total,
                               num_classes) for kind in kinds]
    probe = MemoryProbe(runtime.device)
    benchmark(runs, batches, opts, probe, runtime.device)
    report(config, runs, first, opts, probe, source)
    return per_task_line(runs)


def main(argv: list[str] | None = None) -> None:
    opts, extra = build_parser().parse_known_args(argv)
    check_options(opts)
    configs = split_list(opts.configs, "--configs", list(CONFIGS))
    names = split_list(opts.strategies, "--strategies", list(STRATEGIES))
    variants = [Variant(*v) for v in itertools.product(
        split_list(opts.amp, "--amp", ["off", "bf16", "fp16"]),
        split_list(opts.channels_last, "--channels_last", ["auto", "on", "off"]),
        split_list(opts.patch_chunks, "--patch_chunks"))]
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    print("# OASS training-iteration benchmark" + ("\n" if opts.format == "markdown" else ""))
    print_block(machine_lines(setup_runtime(trainer_args(names[0], [], opts, variants[0], extra)).device)
                + [f"passed to the trainer's parser: {' '.join(extra) if extra else '(nothing)'}"], opts.format)
    lines = [run_config(config, names, variants, opts, extra) for config in configs]
    if any(lines):
        print(f"\nper-task loop ratios, configs in order ({', '.join(configs)}):")
        print("\n".join(line for line in lines if line))


if __name__ == "__main__":
    run_cli(main)
