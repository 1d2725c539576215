"""The uint8 input pipeline (issue #19): workers crop and pad in uint8, the step normalises on the device, and
the tensors are those of the float32 path it replaced; --num_workers auto; the pipeline benchmark runs."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from core.config import parse_args
from core.runtime import MAX_AUTO_WORKERS, loader_workers
from core.step import device_images
from tools.augment import PackedImages, TrainTransform, normalize_packed
from tools.images import MultiLabelImages

ROOT = Path(__file__).resolve().parents[1]


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# larger and smaller than the crop in each direction, so both the crop and the pad paths are taken
IMAGES = [noise(w, h, i) for i, (w, h) in enumerate([(500, 375), (60, 100), (200, 600), (130, 40)])]


@pytest.mark.parametrize("augment", ["", "colorjitter+randaugment"])
def test_packed_batches_normalised_equal_the_float_path(augment):
    old = TrainTransform(128, 60, 200, augment=augment)
    new = TrainTransform(128, 60, 200, augment=augment, packed=True)
    for seed in range(6):
        expected = torch.stack([old(img, np.random.default_rng(seed * 10 + i)) for i, img in enumerate(IMAGES)])
        packed = default_collate([new(img, np.random.default_rng(seed * 10 + i)) for i, img in enumerate(IMAGES)])
        assert isinstance(packed, PackedImages) and packed.pixels.dtype == torch.uint8
        got = normalize_packed(packed)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        # the pad is exactly what it was: +0.0 wherever the old canvas had no image
        assert torch.equal((expected == 0) & (expected.signbit() == 0), (got == 0) & (got.signbit() == 0))


def test_the_loader_hands_over_uint8_and_the_step_input_matches(tmp_path):
    paths = []
    for i, img in enumerate(IMAGES):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    labels = np.eye(4, dtype=np.float32)
    keys = [[(i, 100 + i) for i in range(4)]]
    old = DataLoader(MultiLabelImages(paths, labels, TrainTransform(96, 50, 150)), batch_sampler=keys)
    new = DataLoader(MultiLabelImages(paths, labels, TrainTransform(96, 50, 150, packed=True)), batch_sampler=keys)
    (old_images, old_labels, _), (new_images, new_labels, _) = next(iter(old)), next(iter(new))
    assert new_images.pixels.dtype == torch.uint8 and new_images.boxes.shape == (4, 4)
    for channels_last in (False, True):
        got = device_images(new_images, torch.device("cpu"), channels_last)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got, old_images, rtol=0, atol=1e-6)
    assert torch.equal(device_images(old_images, torch.device("cpu"), False), old_images)  # float: only moved
    assert torch.equal(old_labels, new_labels)


def test_num_workers_auto_follows_the_cpus(monkeypatch):
    monkeypatch.setattr("core.runtime.available_cpus", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto") == MAX_AUTO_WORKERS == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the node's 16 CPUs
    assert loader_workers("auto") == 3
    monkeypatch.setattr("core.runtime.available_cpus", lambda: 2)
    assert loader_workers("auto") == 0  # half a CPU each: load in the process itself
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert loader_workers("auto") == 1 and loader_workers(5) == 5


def test_num_workers_flag_takes_auto_and_numbers():
    base = ["--data_dir", "unused"]
    assert parse_args({}, base).num_workers == "auto"
    assert parse_args({}, [*base, "--num_workers", "3"]).num_workers == 3
    assert parse_args({}, ["--demo"]).num_workers == 1  # the demo recipe's


def test_benchmark_prints_the_ratio_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "input_pipeline.py"), "--images", "4",
                          "--width", "100", "--height", "75", "--image_size", "64", "--min_image_size", "48",
                          "--max_image_size", "96", "--batch_size", "2", "--repeats", "1", "--step_ms", "100"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert re.fullmatch(r"input pipeline: new vs old per worker: \d+\.\d\dx", lines[-1]), lines[-1]
    assert float(lines[-1].split()[-1].rstrip("x")) > 0
    for name in ("old", "new"):
        assert any(re.fullmatch(rf"workers to feed a 100 ms step of 2 images: {name} \d+", line) for line in lines)
        assert any(line.startswith(f"| {name} | ") for line in lines)
