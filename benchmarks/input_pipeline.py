"""Per-worker throughput of the training input pipeline: today's uint8 path against the float32 one it replaced.

    python benchmarks/input_pipeline.py                       # 64 VOC-sized JPEGs, 512 px crops, batch 32
    python benchmarks/input_pipeline.py --step_ms 450 --batch_size 32

A DataLoader worker decodes each JPEG, runs the training transform (resize, flip, crop and pad) and
collates a batch. This measures that per-image cost in one process, both paths side by side on the same
generated JPEGs and seeds, interleaved round-robin over repeats (median reported):

- old: TrainTransform(packed=False): normalise to float32 in the worker, collate float32 batches;
- new: TrainTransform(packed=True): crop and pad in uint8, collate uint8 batches; normalize_packed() runs on
  the training device instead (its CPU cost is printed apart: it is the main process's on a CPU run).

It then breaks each path down by stage (decode, resize, the rest of the transform, collate) so that the
remaining time has a name, and prints how many workers feed a step of --step_ms at --batch_size.
The images are synthetic (smooth colour fields plus noise, saved as JPEG quality 90, 500x375 like VOC):
their decode cost is close to VOC's, not equal. Timings depend on the machine's load; see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/input_pipeline.py` from any folder
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from benchmarks.measure import machine_lines  # noqa: E402
from tools.augment import TrainTransform, normalize_packed, random_long_side_size  # noqa: E402
from tools.errors import UserError, run_cli  # noqa: E402
from tools.images import load_rgb_image  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="generated JPEGs (each timed once per repeat)")
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--image_size", type=int, default=512, help="the crop (the recipe's 512)")
    p.add_argument("--min_image_size", type=int, default=320)
    p.add_argument("--max_image_size", type=int, default=640)
    p.add_argument("--batch_size", type=int, default=32, help="images per collated batch, and per step below")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--step_ms", type=float, default=1000.0, help="a training step's time to feed (workers needed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a DataLoader worker uses 1)")
    return p


def make_jpegs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """VOC-like JPEGs: smooth colour fields with noise (a flat image would decode unrealistically fast)."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        waves = [np.sin(xs / rng.uniform(8, 60) + rng.uniform(0, 6)) * np.cos(ys / rng.uniform(8, 60)) for _ in "rgb"]
        field = np.stack(waves, -1) * 90 + 128 + rng.normal(0, 12, (height, width, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def run_path(paths: list[Path], transform: TrainTransform, batch_size: int) -> float:
    """Seconds for decode + transform + collate of every image, in batches of batch_size."""
    start = time.perf_counter()
    for first in range(0, len(paths), batch_size):
        samples = [transform(load_rgb_image(p), np.random.default_rng(first + i))
                   for i, p in enumerate(paths[first:first + batch_size])]
        default_collate(samples)
    return time.perf_counter() - start


def stage_times(paths: list[Path], transform: TrainTransform, batch_size: int, opts) -> dict[str, float]:
    """Seconds per stage over all images: decode, the bicubic resize alone, the rest of the transform, collate."""
    decode = resize = rest = collate = 0.0
    for first in range(0, len(paths), batch_size):
        samples = []
        for i, path in enumerate(paths[first:first + batch_size]):
            t0 = time.perf_counter()
            img = load_rgb_image(path)
            t1 = time.perf_counter()
            # the resize the transform makes for this seed, timed alone (the transform repeats it below)
            size = random_long_side_size(img.width, img.height, opts.min_image_size, opts.max_image_size,
                                         np.random.default_rng(first + i))
            img.resize(size, Image.BICUBIC)
            t2 = time.perf_counter()
            samples.append(transform(img, np.random.default_rng(first + i)))
            t3 = time.perf_counter()
            decode, resize, rest = decode + t1 - t0, resize + t2 - t1, rest + (t3 - t2) - (t2 - t1)
        t4 = time.perf_counter()
        default_collate(samples)
        collate += time.perf_counter() - t4
    return {"decode": decode, "resize": resize, "crop/pad/normalise": max(rest, 0.0), "collate": collate}


def device_normalise_ms(opts) -> float:
    """CPU milliseconds of normalize_packed per image, for a batch of batch_size crops."""
    pixels = torch.randint(0, 256, (opts.batch_size, 3, opts.image_size, opts.image_size), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, opts.image_size, opts.image_size]] * opts.batch_size, dtype=torch.int32)
    times = []
    for _ in range(max(opts.repeats, 2)):
        start = time.perf_counter()
        normalize_packed((pixels, boxes))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / opts.batch_size


def median_rate(runs: dict[str, list[float]], name: str, count: int) -> float:
    return count / statistics.median(runs[name])


def workers_needed(images_per_s: float, opts) -> int:
    """Workers whose combined rate delivers batch_size images per step_ms."""
    return math.ceil(opts.batch_size / (opts.step_ms / 1000) / images_per_s)


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    if min(opts.images, opts.batch_size, opts.repeats, opts.image_size, opts.threads) < 1 or opts.step_ms <= 0:
        raise UserError("--images, --batch_size, --repeats, --image_size and --threads must be at least 1, "
                        "--step_ms positive")
    torch.set_num_threads(opts.threads)
    for line in machine_lines(torch.device("cpu")):
        print(line)
    sizes = (opts.image_size, opts.min_image_size, opts.max_image_size)
    paths: dict[str, Callable] = {"old": TrainTransform(*sizes, packed=False),
                                  "new": TrainTransform(*sizes, packed=True)}
    with tempfile.TemporaryDirectory() as folder:
        files = make_jpegs(Path(folder), opts.images, opts.width, opts.height)
        print(f"# {opts.images} JPEGs {opts.width}x{opts.height} (quality 90), crop {opts.image_size}, long side "
              f"{opts.min_image_size}-{opts.max_image_size} (PIL bicubic), batches of {opts.batch_size}, "
              f"{opts.threads} torch thread(s), median of {opts.repeats} interleaved repeats")
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for transform in paths.values():  # warm-up: file cache, allocator
            run_path(files[:opts.batch_size], transform, opts.batch_size)
        for _ in range(opts.repeats):
            for name, transform in paths.items():
                runs[name].append(run_path(files, transform, opts.batch_size))
        stages = {name: stage_times(files, transform, opts.batch_size, opts) for name, transform in paths.items()}
    rates = {name: median_rate(runs, name, opts.images) for name in paths}
    print("| path | images/s per worker | ms/image | " + " | ".join(f"{s} ms" for s in stages["old"]) + " |")
    print("|---|---|---|" + "---|" * len(stages["old"]))
    for name in paths:
        cells = " | ".join(f"{t * 1000 / opts.images:.2f}" for t in stages[name].values())
        print(f"| {name} | {rates[name]:.1f} | {1000 / rates[name]:.2f} | {cells} |")
    print(f"# normalize_packed on this CPU: {device_normalise_ms(opts):.2f} ms/image (on a GPU it runs on the device)")
    for name in paths:
        print(f"workers to feed a {opts.step_ms:.0f} ms step of {opts.batch_size} images: {name} "
              f"{workers_needed(rates[name], opts)}")
    print(f"input pipeline: new vs old per worker: {rates['new'] / rates['old']:.2f}x")


if __name__ == "__main__":
    run_cli(lambda: main())
