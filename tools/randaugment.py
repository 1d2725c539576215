"""FixMatch's RandAugmentMC(n=2, m=10), the reference's `--augment randaugment`, driven by a numpy Generator.

One call draws `n` ops with replacement from FixMatch's 14-op pool; each gets a level v from 1..m-1
and is applied with probability 0.5; a black 16-px cutout follows whatever was applied. Every op
maps v to its parameter as FixMatch-pytorch does (`v * max_v / 10 + bias`, truncated to int for
Posterize, Rotate and Solarize), and the ops with a direction flip its sign with probability 0.5.

Fidelity notes:
- All draws (op choice, level, apply coin, sign coin, cutout centre) come from the numpy Generator
  passed in, in the reference's order, instead of Python's `random` and numpy's global generator:
  same distributions, different streams, and a sample is a pure function of its seed.
- Cutout colour is black (0, 0, 0), as in the PuzzleCAM-lineage `tools/ai/randaugment.py` that the
  reference imports; kekmodel/FixMatch-pytorch itself paints grey (127, 127, 127).
- Every op is written with PIL, as FixMatch does. On PIL images torchvision's functional ops give
  the same pixels for the photometric ops (autocontrast, equalize, posterize, solarize, the four
  enhancers) and for rotate, but not for shear and translate: F.affine shears by an angle about the
  image centre (FixMatch: a raw coefficient about the top-left corner) and its translate moves
  content the opposite way to PIL's inverse-map coefficients. torchvision's own RandAugment also
  maps magnitudes differently (signed enhance factors around 1, no 0.05 bias). Writing all 14 with
  PIL keeps one semantics and FixMatch's exact parameters.
- The enhance factors (Brightness, Color, Contrast, Sharpness) lie in [0.14, 0.86]: FixMatch-pytorch's
  mapping only ever weakens, unlike the paper's symmetric range; kept as the reference has it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

PARAMETER_MAX = 10  # FixMatch scales a level v by v / PARAMETER_MAX
CUTOUT_SIZE = 16  # PIL draws the inclusive box, so 17 x 17 pixels away from the right/bottom edges
CUTOUT_COLOR = (0, 0, 0)

Box = tuple[int, int, int, int]


def auto_contrast(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.autocontrast(img)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def color(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def equalize(img: Image.Image, _: float) -> Image.Image:
    return ImageOps.equalize(img)


def identity(img: Image.Image, _: float) -> Image.Image:
    return img


def posterize(img: Image.Image, bits: float) -> Image.Image:
    return ImageOps.posterize(img, int(bits))


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Counter-clockwise about the centre, nearest neighbour, same size, black corners (PIL defaults)."""
    return img.rotate(degrees)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(factor)


def _affine(img: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    # PIL's coefficients map each output pixel to its input position; nearest neighbour, black fill.
    return img.transform(img.size, Image.Transform.AFFINE, coefficients)


def shear_x(img: Image.Image, shear: float) -> Image.Image:
    return _affine(img, (1, shear, 0, 0, 1, 0))


def shear_y(img: Image.Image, shear: float) -> Image.Image:
    return _affine(img, (1, 0, 0, shear, 1, 0))


def solarize(img: Image.Image, strength: float) -> Image.Image:
    """Invert pixels >= 256 - strength (FixMatch passes the threshold that way round)."""
    return ImageOps.solarize(img, 256 - int(strength))


def translate_x(img: Image.Image, fraction: float) -> Image.Image:
    """Content moves left by int(fraction * width) pixels (right when negative)."""
    return _affine(img, (1, 0, int(fraction * img.width), 0, 1, 0))


def translate_y(img: Image.Image, fraction: float) -> Image.Image:
    """Content moves up by int(fraction * height) pixels (down when negative)."""
    return _affine(img, (1, 0, 0, 0, 1, int(fraction * img.height)))


@dataclass(frozen=True)
class PoolOp:
    """One entry of FixMatch's pool: level v -> parameter, then the PIL op with that parameter."""

    name: str
    apply: Callable[[Image.Image, float], Image.Image]
    max_v: float = 0.0
    bias: float = 0.0
    integer: bool = False  # FixMatch's _int_parameter: truncate v * max_v / 10 before adding the bias
    signed: bool = False  # a coin flips the parameter's sign

    def parameter(self, level: int) -> float:
        scaled = level * self.max_v / PARAMETER_MAX
        return (int(scaled) if self.integer else float(scaled)) + self.bias


FIXMATCH_POOL: tuple[PoolOp, ...] = (
    PoolOp("AutoContrast", auto_contrast),
    PoolOp("Brightness", brightness, 0.9, 0.05),
    PoolOp("Color", color, 0.9, 0.05),
    PoolOp("Contrast", contrast, 0.9, 0.05),
    PoolOp("Equalize", equalize),
    PoolOp("Identity", identity),
    PoolOp("Posterize", posterize, 4, 4, integer=True),
    PoolOp("Rotate", rotate, 30, 0, integer=True, signed=True),
    PoolOp("Sharpness", sharpness, 0.9, 0.05),
    PoolOp("ShearX", shear_x, 0.3, 0, signed=True),
    PoolOp("ShearY", shear_y, 0.3, 0, signed=True),
    PoolOp("Solarize", solarize, 256, 0, integer=True),
    PoolOp("TranslateX", translate_x, 0.3, 0, signed=True),
    PoolOp("TranslateY", translate_y, 0.3, 0, signed=True),
)


@dataclass(frozen=True)
class Step:
    """One drawn op: its level, whether the 0.5 coin applies it, and the (signed) parameter it gets."""

    op: PoolOp
    level: int
    applied: bool
    parameter: float


def cutout_box(width: int, height: int, rng: np.random.Generator, size: int = CUTOUT_SIZE) -> Box:
    """FixMatch's CutoutAbs box: a uniform centre, the corner clamped at 0, the far side at the border."""
    centre_x, centre_y = rng.uniform(0, width), rng.uniform(0, height)
    left = int(max(0.0, centre_x - size / 2))
    top = int(max(0.0, centre_y - size / 2))
    return left, top, int(min(width, left + size)), int(min(height, top + size))


def cutout(img: Image.Image, box: Box, fill: tuple[int, int, int] = CUTOUT_COLOR) -> Image.Image:
    """Paint the box, both corners included (PIL's rectangle), on a copy."""
    out = img.copy()
    ImageDraw.Draw(out).rectangle(box, fill=fill)
    return out


class RandAugmentMC:
    """FixMatch's RandAugmentMC(n, m) on PIL images, every draw from the Generator given to the call."""

    def __init__(self, n: int = 2, m: int = 10):
        if n < 1 or not 2 <= m <= PARAMETER_MAX:  # m = 1 would leave no level to draw from 1..m-1
            raise ValueError(f"RandAugmentMC needs n >= 1 and 2 <= m <= {PARAMETER_MAX}, got n={n}, m={m}")
        self.n, self.m = int(n), int(m)

    def draw_steps(self, rng: np.random.Generator) -> list[Step]:
        """The ops first (with replacement), then per op its level, apply coin and, if applied, sign coin."""
        chosen = [FIXMATCH_POOL[int(i)] for i in rng.integers(0, len(FIXMATCH_POOL), size=self.n)]
        steps = []
        for op in chosen:
            level = int(rng.integers(1, self.m))  # numpy's randint(1, m): 1..m-1, as FixMatch
            applied = bool(rng.random() < 0.5)
            parameter = op.parameter(level)
            if applied and op.signed and rng.random() < 0.5:
                parameter = -parameter
            steps.append(Step(op, level, applied, parameter))
        return steps

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for step in self.draw_steps(rng):
            if step.applied:
                img = step.op.apply(img, step.parameter)
        return cutout(img, cutout_box(img.width, img.height, rng))

    def __repr__(self) -> str:
        return f"RandAugmentMC(n={self.n}, m={self.m})"
