"""Training/evaluation transforms: sizes, zero padding, crops, flips, seed-only randomness, and the
--augment options (torchvision's ColorJitter, FixMatch's RandAugmentMC) checked against oracles."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image, ImageEnhance, ImageOps

import tools.augment as augment_module
import tools.randaugment as ra
from tools.augment import (
    AUGMENT_CHOICES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitter,
    EvalTransform,
    TrainTransform,
    long_side_size,
    normalize,
    random_long_side_size,
)
from tools.errors import UserError
from tools.randaugment import FIXMATCH_POOL, RandAugmentMC, cutout, cutout_box

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


# --------------------------------------------------------------------------------------------------
# --augment: validation and wiring into TrainTransform
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["jitter", "ColorJitter", "randaugment+colorjitter", " randaugment", "all"])
def test_unknown_augment_is_a_one_line_user_error(bad):
    with pytest.raises(UserError, match="valid values") as caught:
        TrainTransform(32, 32, 32, augment=bad)
    message = str(caught.value)
    assert "\n" not in message and all(repr(choice) in message for choice in AUGMENT_CHOICES)


def test_repr_names_the_augment_option():
    assert repr(TrainTransform(32, 20, 40, augment="colorjitter+randaugment")) == (
        "TrainTransform(image_size=32, min_size=20, max_size=40, augment='colorjitter+randaugment')")


def record_pil_stage(monkeypatch, replace_with=None) -> list[tuple[str, Image.Image]]:
    """Make both augmentations record the PIL image they get (and return it, or replace_with(img))."""
    seen: list[tuple[str, Image.Image]] = []

    def recorder(name):
        def call(self, img, rng):
            seen.append((name, img.copy()))
            return img if replace_with is None else replace_with(img)
        return call

    monkeypatch.setattr(augment_module.ColorJitter, "__call__", recorder("colorjitter"))
    monkeypatch.setattr(augment_module.RandAugmentMC, "__call__", recorder("randaugment"))
    return seen


@pytest.mark.parametrize("augment, expected", [("", []), ("colorjitter", ["colorjitter"]),
                                               ("randaugment", ["randaugment"]),
                                               ("colorjitter+randaugment", ["colorjitter", "randaugment"])])
def test_augment_runs_the_named_ops_in_the_reference_order(monkeypatch, augment, expected):
    seen = record_pil_stage(monkeypatch)
    TrainTransform(32, 40, 40, augment=augment)(noise_image(60, 30), np.random.default_rng(0))
    assert [name for name, _ in seen] == expected
    assert all(img.mode == "RGB" and img.size == (40, 20) for _, img in seen)  # after the resize


def test_augment_sees_the_flipped_pil_image(monkeypatch):
    seen = record_pil_stage(monkeypatch)
    img = noise_image(40, 40)  # min = max = 40: resizing keeps the pixels
    plain = np.asarray(img)
    for seed in range(12):
        TrainTransform(24, 40, 40, augment="colorjitter")(img, np.random.default_rng(seed))
    flips = []
    for _, got in seen:
        got = np.asarray(got)
        assert np.array_equal(got, plain) or np.array_equal(got, plain[:, ::-1])
        flips.append(np.array_equal(got, plain[:, ::-1]))
    assert any(flips) and not all(flips)


def test_augment_happens_before_normalisation(monkeypatch):
    record_pil_stage(monkeypatch, replace_with=lambda img: Image.new("RGB", img.size, (255, 0, 0)))
    out = TrainTransform(24, 40, 40, augment="randaugment")(noise_image(40, 40), np.random.default_rng(3))
    red = (np.array([1.0, 0.0, 0.0], np.float32)[:, None, None] - MEAN) / STD
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(red, (3, 24, 24)), rtol=1e-5)


def test_augmented_sample_depends_only_on_its_seed():
    img = noise_image(90, 70)
    transform = TrainTransform(64, 50, 120, augment="colorjitter+randaugment")
    outs = []
    for global_seed in (1, 2):
        random.seed(global_seed)
        np.random.seed(global_seed)
        torch.manual_seed(global_seed)
        outs.append(transform(img, np.random.default_rng(42)))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], TrainTransform(64, 50, 120)(img, np.random.default_rng(42)))
    assert all(not torch.equal(outs[0], transform(img, np.random.default_rng(seed))) for seed in range(4))


# --------------------------------------------------------------------------------------------------
# ColorJitter(0.3, 0.3, 0.3, 0.1): our numpy draws, torchvision's adjustments
# --------------------------------------------------------------------------------------------------

def test_colorjitter_equals_torchvision_given_the_same_parameters(monkeypatch):
    img = noise_image(31, 23, seed=5)
    jitter = ColorJitter(0.3, 0.3, 0.3, 0.1)
    for seed in range(6):
        order, factors = jitter.get_params(np.random.default_rng(seed))
        monkeypatch.setattr(T.ColorJitter, "get_params",
                            staticmethod(lambda *ranges, o=order, f=factors: (torch.tensor(o), *f)))
        expected = T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)(img)
        got = jitter(img, np.random.default_rng(seed))
        assert got.mode == "RGB" and got.size == img.size
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_colorjitter_order_matters_and_is_followed():
    img = noise_image(20, 20, seed=2)
    factors = [1.3, 0.7, 1.3, 0.1]
    forward = np.asarray(ColorJitter.apply(img, [0, 1, 2, 3], factors))
    assert not np.array_equal(forward, np.asarray(ColorJitter.apply(img, [3, 2, 1, 0], factors)))
    by_hand = img
    for adjust, factor in zip([ImageEnhance.Brightness, ImageEnhance.Contrast], factors[:2]):
        by_hand = adjust(by_hand).enhance(factor)  # torchvision's PIL brightness/contrast are these
    np.testing.assert_array_equal(np.asarray(ColorJitter.apply(img, [0, 1], factors)), np.asarray(by_hand))


def test_colorjitter_draws_cover_torchvision_ranges():
    reference = T.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1)
    jitter = ColorJitter(0.3, 0.3, 0.3, 0.1)
    expected_ranges = [reference.brightness, reference.contrast, reference.saturation, reference.hue]
    np.testing.assert_allclose(np.asarray(jitter.ranges), np.asarray(expected_ranges))
    np.testing.assert_allclose(np.asarray(expected_ranges), [[0.7, 1.3]] * 3 + [[-0.1, 0.1]])
    rng = np.random.default_rng(0)
    draws = [jitter.get_params(rng) for _ in range(3000)]
    factors = np.asarray([f for _, f in draws])
    for column, (low, high) in enumerate(expected_ranges):
        assert low <= factors[:, column].min() < low + 0.01 and high - 0.01 < factors[:, column].max() < high
        assert abs(factors[:, column].mean() - (low + high) / 2) < 0.01
    assert {tuple(order) for order, _ in draws} == set(itertools.permutations(range(4)))


# --------------------------------------------------------------------------------------------------
# RandAugmentMC(2, 10): FixMatch's pool, magnitudes, ops, cutout
# --------------------------------------------------------------------------------------------------

def op(name: str) -> ra.PoolOp:
    return next(o for o in FIXMATCH_POOL if o.name == name)


def test_pool_is_fixmatchs_fourteen_ops():
    assert [o.name for o in FIXMATCH_POOL] == [
        "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize", "Rotate",
        "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY"]
    assert {o.name for o in FIXMATCH_POOL if o.signed} == {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


LEVELS = range(1, 10)
ENHANCE = [0.14, 0.23, 0.32, 0.41, 0.50, 0.59, 0.68, 0.77, 0.86]  # v * 0.9 / 10 + 0.05


@pytest.mark.parametrize("name, expected", [
    ("Brightness", ENHANCE), ("Color", ENHANCE), ("Contrast", ENHANCE), ("Sharpness", ENHANCE),
    ("Posterize", [4, 4, 5, 5, 6, 6, 6, 7, 7]),  # int(v * 4 / 10) + 4 bits kept
    ("Rotate", [3, 6, 9, 12, 15, 18, 21, 24, 27]),  # int(v * 30 / 10) degrees
    ("ShearX", [0.03 * v for v in LEVELS]), ("ShearY", [0.03 * v for v in LEVELS]),
    ("Solarize", [25, 51, 76, 102, 128, 153, 179, 204, 230]),  # int(v * 256 / 10): threshold 256 - that
    ("TranslateX", [0.03 * v for v in LEVELS]), ("TranslateY", [0.03 * v for v in LEVELS]),
])
def test_level_to_parameter_mapping(name, expected):
    got = [op(name).parameter(v) for v in LEVELS]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    if name in ("Posterize", "Rotate", "Solarize"):
        assert all(isinstance(p, int) for p in got)


def strict_noise(width: int = 45, height: int = 33, seed: int = 0) -> Image.Image:
    """Noise without pure black, so black fill and cutout pixels are recognisable."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, size=(height, width, 3), dtype=np.uint8))


def nearest_affine_oracle(pixels: np.ndarray, source_of) -> np.ndarray:
    """out[y, x] = pixels[source_of(x, y)] or black outside, for a map given per output pixel."""
    height, width = pixels.shape[:2]
    out = np.zeros_like(pixels)
    for y in range(height):
        for x in range(width):
            sx, sy = source_of(x, y)
            if 0 <= sx < width and 0 <= sy < height:
                out[y, x] = pixels[sy, sx]
    return out


@pytest.mark.parametrize("sign", [1, -1])
def test_geometric_ops_against_hand_oracles(sign):
    img = strict_noise()
    pixels = np.asarray(img)
    shear = sign * op("ShearX").parameter(7)  # 0.21
    # PIL's nearest neighbour samples the input at floor of the mapped pixel centre.
    expected_x = nearest_affine_oracle(pixels, lambda x, y: (int(np.floor(x + 0.5 + shear * (y + 0.5))), y))
    expected_y = nearest_affine_oracle(pixels, lambda x, y: (x, int(np.floor(y + 0.5 + shear * (x + 0.5)))))
    np.testing.assert_array_equal(np.asarray(op("ShearX").apply(img, shear)), expected_x)
    np.testing.assert_array_equal(np.asarray(op("ShearY").apply(img, shear)), expected_y)

    fraction = sign * op("TranslateX").parameter(9)  # 0.27: int(0.27 * 45) = 12, int(0.27 * 33) = 8 px
    dx, dy = sign * 12, sign * 8
    np.testing.assert_array_equal(np.asarray(op("TranslateX").apply(img, fraction)),
                                  nearest_affine_oracle(pixels, lambda x, y: (x + dx, y)))
    np.testing.assert_array_equal(np.asarray(op("TranslateY").apply(img, fraction)),
                                  nearest_affine_oracle(pixels, lambda x, y: (x, y + dy)))

    degrees = sign * op("Rotate").parameter(9)  # 27 degrees
    rotated = op("Rotate").apply(img, degrees)
    np.testing.assert_array_equal(np.asarray(rotated), np.asarray(img.rotate(degrees, Image.Resampling.NEAREST)))
    white = op("Rotate").apply(Image.new("RGB", (40, 40), "white"), degrees)
    assert white.getpixel((0, 0)) == (0, 0, 0) and white.getpixel((20, 20)) == (255, 255, 255)


def test_photometric_ops_against_hand_oracles():
    img = strict_noise()
    pixels = np.asarray(img).astype(np.int64)

    bits = op("Posterize").parameter(3)  # 5 bits: clear the lower 3
    np.testing.assert_array_equal(np.asarray(op("Posterize").apply(img, bits)), pixels & 0b11111000)

    strength = op("Solarize").parameter(5)  # threshold 256 - 128 = 128
    np.testing.assert_array_equal(np.asarray(op("Solarize").apply(img, strength)),
                                  np.where(pixels >= 128, 255 - pixels, pixels))

    factor = op("Brightness").parameter(5)  # 0.5: a blend with black
    got = np.asarray(op("Brightness").apply(img, factor)).astype(np.int64)
    assert np.abs(got - pixels * 0.5).max() <= 1

    low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
    stretched = (pixels - low) * 255.0 / (high - low)
    assert np.abs(np.asarray(op("AutoContrast").apply(img, 0)).astype(np.int64) - stretched).max() <= 1

    assert np.array_equal(np.asarray(op("Identity").apply(img, 0)), pixels)
    np.testing.assert_array_equal(np.asarray(op("Equalize").apply(img, 0)), np.asarray(ImageOps.equalize(img)))
    for name, enhancer in [("Color", ImageEnhance.Color), ("Contrast", ImageEnhance.Contrast),
                           ("Sharpness", ImageEnhance.Sharpness)]:
        factor = op(name).parameter(8)  # 0.77
        np.testing.assert_array_equal(np.asarray(op(name).apply(img, factor)),
                                      np.asarray(enhancer(img).enhance(0.77)))


def test_every_op_keeps_size_and_mode():
    img = strict_noise(37, 21)
    for pool_op in FIXMATCH_POOL:
        for level in (1, 9):
            out = pool_op.apply(img, -pool_op.parameter(level) if pool_op.signed else pool_op.parameter(level))
            assert out.size == (37, 21) and out.mode == "RGB", pool_op.name


class FixedUniform:
    """Stands in for a Generator whose next uniform draws are given."""

    def __init__(self, *values: float):
        self.values = list(values)

    def uniform(self, low: float, high: float) -> float:
        value = self.values.pop(0)
        assert low <= value < high
        return value


@pytest.mark.parametrize("centre, rows, cols", [
    ((30.7, 20.2), (12, 29), (22, 39)),  # box (22, 12, 38, 28), both corners drawn: 17 x 17
    ((3.0, 7.9), (0, 17), (0, 17)),  # corner clamped at 0, far side at 16: still 17 x 17
    ((60.5, 47.99), (39, 48), (52, 64)),  # far sides clamped at the border: 12 x 9
])
def test_cutout_box_and_paint(centre, rows, cols):
    img = strict_noise(64, 48)
    box = cutout_box(64, 48, FixedUniform(*centre))
    out = np.asarray(cutout(img, box))
    expected = np.asarray(img).copy()
    expected[rows[0]:rows[1], cols[0]:cols[1]] = 0
    np.testing.assert_array_equal(out, expected)
    assert np.asarray(img).min() > 0  # the input is left alone


def test_draw_steps_statistics():
    augmenter = RandAugmentMC(n=2, m=10)
    rng = np.random.default_rng(0)
    all_steps = [augmenter.draw_steps(rng) for _ in range(3000)]
    assert all(len(steps) == 2 for steps in all_steps)
    flat = [step for steps in all_steps for step in steps]
    assert {step.level for step in flat} == set(LEVELS)
    assert {step.op.name for step in flat} == {o.name for o in FIXMATCH_POOL}
    assert any(a.op is b.op for a, b in all_steps)  # with replacement
    assert 0.47 < np.mean([step.applied for step in flat]) < 0.53
    for step in flat:
        assert abs(step.parameter) == step.op.parameter(step.level)
        assert step.parameter >= 0 or (step.op.signed and step.applied)
    signed = [step.parameter < 0 for step in flat if step.applied and step.op.signed]
    assert 0.45 < np.mean(signed) < 0.55


def test_call_applies_drawn_steps_then_one_cutout():
    img = strict_noise(50, 40)
    augmenter = RandAugmentMC(2, 10)
    for seed in range(40):
        replay = np.random.default_rng(seed)
        expected = img
        for step in augmenter.draw_steps(replay):
            if step.applied:
                expected = step.op.apply(expected, step.parameter)
        expected = cutout(expected, cutout_box(50, 40, replay))
        got = augmenter(img, np.random.default_rng(seed))
        assert got.size == (50, 40) and got.mode == "RGB"
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_cutout_alone_when_no_op_applies():
    img = strict_noise(50, 40)
    augmenter = RandAugmentMC(2, 10)
    checked = 0
    for seed in range(60):
        if any(step.applied for step in augmenter.draw_steps(np.random.default_rng(seed))):
            continue
        changed = (np.asarray(augmenter(img, np.random.default_rng(seed))) != np.asarray(img)).any(axis=2)
        rows, cols = np.nonzero(changed)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert changed.sum() == height * width  # one filled rectangle
        assert (height == 17 or rows.max() == 39) and (width == 17 or cols.max() == 49)
        checked += 1
    assert checked >= 5


def test_randaugment_is_deterministic_per_seed_only():
    img = strict_noise(48, 36)
    augmenter = RandAugmentMC(2, 10)
    outs = []
    for global_seed in (0, 1):
        random.seed(global_seed)
        np.random.seed(global_seed)
        outs.append(np.asarray(augmenter(img, np.random.default_rng(7))))
    assert np.array_equal(*outs)
    others = [np.asarray(augmenter(img, np.random.default_rng(seed))) for seed in range(8)]
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(others, 2))


@pytest.mark.parametrize("n, m", [(0, 10), (2, 1), (2, 11)])
def test_randaugment_rejects_bad_settings(n, m):
    with pytest.raises(ValueError, match="RandAugmentMC"):
        RandAugmentMC(n, m)
