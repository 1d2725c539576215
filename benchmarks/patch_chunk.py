"""How many tiles per forward of the EMA teacher is fastest: the measurements behind --patch_chunk auto.

    python benchmarks/patch_chunk.py --architecture resnet50 --tile 128 --tiles 80 --chunks 0,4,8,16,32
    python benchmarks/patch_chunk.py --architecture resnet18 --tile 64 --tiles 168 --layouts nchw,channels_last

Times `core.step.patch_features` (the function the training step calls) on random tiles with the
teacher's settings: train mode, no gradient, BatchNorm grouped as one reference call of 4 tiles
per task over --reference_gpus chunks. Every (layout, chunk) setting runs on the same tiles and
weights; the settings are interleaved within each repeat (the start rotating), so that load on a
shared machine hits all settings alike. The report gives each setting's median wall-clock and CPU
time, as ratios to the first setting, and its minor page faults per pass (what makes one big
forward slow on the CPU: benchmarks/README.md). `auto` in --chunks is what `--patch_chunk auto` picks.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.config import parse_args  # noqa: E402
from core.step import auto_patch_chunk, build_model, freeze_as_teacher, patch_features, tile_plan  # noqa: E402
from tools.errors import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--architecture", default="resnet50")
    p.add_argument("--tile", type=int, default=128, help="tile side in pixels (half the image size)")
    p.add_argument("--tiles", type=int, default=80, help="tiles per iteration (4 per task)")
    p.add_argument("--chunks", default="0,4,8,16,auto", help="tiles per forward to compare (0 = one forward)")
    p.add_argument("--layouts", default="nchw", help="nchw and/or channels_last")
    p.add_argument("--reference_gpus", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    return p


def teacher_args(opts: argparse.Namespace) -> argparse.Namespace:
    return parse_args({"strategy": "ctopk_w", "head": "csi"}, [
        "--demo", "--device", "cpu", "--architecture", opts.architecture, "--image_size", str(2 * opts.tile),
        "--batch_size", str(opts.reference_gpus), "--reference_gpus", str(opts.reference_gpus)])


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    args = teacher_args(opts)
    torch.manual_seed(0)
    teacher = freeze_as_teacher(build_model(args))
    tiles = torch.randn(opts.tiles, 3, opts.tile, opts.tile)
    plan = tile_plan(args, opts.tiles)
    auto = auto_patch_chunk(torch.device("cpu"), opts.tiles, opts.tile, opts.tile)
    chunks = [auto if c.strip() == "auto" else int(c) for c in opts.chunks.split(",")]
    settings = [(layout, chunk) for layout in opts.layouts.split(",") for chunk in chunks]
    times: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    cpu: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    faults: dict[tuple[str, int], list[int]] = {s: [] for s in settings}

    def run(layout: str, chunk: int) -> None:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        patch_features(teacher.to(memory_format=fmt), tiles.contiguous(memory_format=fmt), plan, chunk, True)

    for setting in settings:  # untimed: oneDNN primitives and allocator caches for each shape
        run(*setting)
    for repeat in range(opts.repeats):
        shift = repeat % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            start_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            run(*setting)
            times[setting].append(time.perf_counter() - start)
            cpu[setting].append(time.process_time() - start_cpu)
            faults[setting].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
    print(f"# {opts.architecture}, {opts.tiles} tiles of {opts.tile} px, reference_gpus {opts.reference_gpus}, "
          f"{torch.get_num_threads()} threads, median of {opts.repeats}; auto = {auto}")
    base, base_cpu = statistics.median(times[settings[0]]), statistics.median(cpu[settings[0]])
    for setting in settings:
        seconds, cpu_seconds = statistics.median(times[setting]), statistics.median(cpu[setting])
        print(f"{setting[0]:>13} chunk {setting[1]:>4}: wall {seconds:.3f} s ({seconds / base:.2f}x first), "
              f"CPU {cpu_seconds:.3f} s ({cpu_seconds / base_cpu:.2f}x first), "
              f"page faults {statistics.median(faults[setting]):.0f}; raw wall "
              + ", ".join(f"{t:.2f}" for t in times[setting]))


if __name__ == "__main__":
    run_cli(main)
