"""Training/evaluation transforms: sizes, zero padding, crops, flips, and seed-only randomness."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from tools.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    long_side_size,
    normalize,
    random_long_side_size,
)
from tools.errors import UserError

MEAN = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.asarray(IMAGENET_STD, np.float32)[:, None, None]


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def reference_normalized(img: Image.Image) -> np.ndarray:
    """CHW float32, written independently of tools.augment."""
    return ((np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0) - MEAN) / STD


def test_normalize_matches_imagenet_statistics():
    white = np.full((2, 3, 3), 255, np.uint8)
    out = normalize(white)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], (1 - MEAN[:, 0, 0]) / STD[:, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("size, long_side, expected", [((200, 100), 64, (64, 32)), ((100, 300), 90, (30, 90)),
                                                       ((50, 50), 77, (77, 77)), ((1000, 3), 10, (10, 1))])
def test_long_side_size(size, long_side, expected):
    assert long_side_size(*size, long_side) == expected


def test_random_long_side_covers_the_range():
    rng = np.random.default_rng(0)
    longs = {max(random_long_side_size(333, 250, 10, 13, rng)) for _ in range(300)}
    assert longs == {10, 11, 12, 13}


def test_train_transform_resizes_long_side_within_bounds(monkeypatch):
    import tools.augment as augment

    sizes = []

    def recording(*args):
        sizes.append(random_long_side_size(*args))
        return sizes[-1]

    monkeypatch.setattr(augment, "random_long_side_size", recording)
    transform = TrainTransform(64, 40, 50)
    for seed in range(30):
        transform(noise_image(120, 80), np.random.default_rng(seed))
    assert len(sizes) == 30 and len(set(sizes)) > 3
    assert all(40 <= max(w, h) <= 50 and abs(w / h - 1.5) < 0.05 for w, h in sizes)


def test_train_output_shape_and_dtype():
    out = TrainTransform(48, 30, 70)(noise_image(60, 45), np.random.default_rng(1))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert out.is_contiguous()


def test_small_image_is_placed_inside_a_zero_canvas():
    img = Image.new("RGB", (20, 10), (255, 0, 0))  # every channel normalises to a non-zero value
    red = (np.array([1, 0, 0]) - MEAN[:, 0, 0]) / STD[:, 0, 0]
    offsets = set()
    for seed in range(20):
        out = TrainTransform(32, 20, 20)(img, np.random.default_rng(seed)).numpy()
        filled = (out != 0).all(axis=0)
        rows, cols = np.nonzero(filled)
        assert filled.sum() == 200 and np.ptp(rows) == 9 and np.ptp(cols) == 19
        assert ((out != 0).any(axis=0) == filled).all()  # outside the image: exactly zero everywhere
        np.testing.assert_allclose(out[:, rows[0], cols[0]], red, rtol=1e-5)
        offsets.add((rows[0], cols[0]))
    assert len(offsets) > 5  # the offset inside the canvas is random, not always top-left


def find_window(full: np.ndarray, crop: np.ndarray) -> tuple[int, int] | None:
    size = crop.shape[1]
    for y in range(full.shape[1] - size + 1):
        for x in range(full.shape[2] - size + 1):
            if np.allclose(full[:, y:y + size, x:x + size], crop, atol=1e-5):
                return y, x
    return None


def test_large_image_crop_is_a_window_of_the_normalised_image_and_flips_happen():
    img = noise_image(40, 40)  # min = max = 40: resizing keeps the pixels
    plain, mirrored = reference_normalized(img), reference_normalized(img)[:, :, ::-1]
    flips, positions = [], set()
    for seed in range(16):
        out = TrainTransform(24, 40, 40)(img, np.random.default_rng(seed)).numpy()
        window = find_window(plain, out)
        flipped = window is None
        window = window or find_window(mirrored, out)
        assert window is not None
        flips.append(flipped)
        positions.add(window)
    assert any(flips) and not all(flips)
    assert len(positions) > 5


def test_same_seed_same_sample_whatever_the_global_generators():
    img = noise_image(90, 70)
    transform = TrainTransform(64, 50, 120)
    outs = []
    for global_seed in (1, 2):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        outs.append(transform(img, np.random.default_rng(42)))
    assert torch.equal(outs[0], outs[1])
    others = [transform(img, np.random.default_rng(seed)) for seed in range(4)]
    assert all(not torch.equal(outs[0], o) for o in others)


def test_train_transform_needs_a_generator():
    with pytest.raises(ValueError, match="Generator"):
        TrainTransform(8, 8, 8)(noise_image(8, 8), None)


def test_eval_pads_and_crops_top_left():
    transform = EvalTransform(32)
    small = noise_image(24, 30)  # width 24, height 30
    out = transform(small).numpy()
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, :30, :24], reference_normalized(small), rtol=1e-5, atol=1e-6)
    assert (out[:, 30:, :] == 0).all() and (out[:, :, 24:] == 0).all()
    big = noise_image(50, 40, seed=3)
    np.testing.assert_allclose(transform(big, np.random.default_rng(0)).numpy(),
                               reference_normalized(big)[:, :32, :32], rtol=1e-5, atol=1e-6)


def test_grayscale_input_is_accepted():
    out = EvalTransform(8)(Image.new("L", (8, 8), 128))
    assert out.shape == (3, 8, 8) and not torch.equal(out[0], out[1])  # per-channel mean/std


def test_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="larger than the maximum"):
        TrainTransform(32, 64, 48)
    with pytest.raises(UserError, match="positive integer"):
        EvalTransform(0)
