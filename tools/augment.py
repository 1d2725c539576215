"""Training and evaluation transforms of the reference recipe, driven by an explicit random generator.

A transform maps (PIL RGB image, numpy Generator) to a CHW float32 tensor. All randomness comes
from the generator passed in, so a training sample is a pure function of its seed, whatever the
worker or process that builds it.

`augment` adds the reference's optional PIL-stage ops between flip and normalisation: torchvision's
ColorJitter(0.3, 0.3, 0.3, 0.1) with its factors drawn from the generator, then FixMatch's
RandAugmentMC(2, 10) (tools/randaugment.py, which lists where it departs from FixMatch).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from tools.errors import UserError
from tools.randaugment import RandAugmentMC

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The reference tests substrings of --augment; we accept exactly these and apply colorjitter first.
AUGMENT_CHOICES: tuple[str, ...] = ("", "colorjitter", "randaugment", "colorjitter+randaugment")

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def long_side_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side equals `long_side`, aspect kept (reference rounding)."""
    scale = long_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def random_long_side_size(width: int, height: int, min_size: int, max_size: int,
                          rng: np.random.Generator) -> tuple[int, int]:
    """Target size whose long side is an integer drawn uniformly from [min_size, max_size]."""
    return long_side_size(width, height, int(rng.integers(min_size, max_size + 1)))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW with ImageNet mean/std (on image / 255)."""
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255.0)
    return ((scaled - _MEAN) / _STD).transpose(2, 0, 1)


def crop_offsets(length: int, crop: int, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """(source start, canvas start, copied length) along one axis.

    An image longer than the crop is cut at a random start; a shorter one is placed at a random
    offset inside the zero canvas (the reference's RandomCrop). rng None: top-left.
    """
    space = length - crop
    if rng is None:
        return 0, 0, min(length, crop)
    if space > 0:
        return int(rng.integers(0, space + 1)), 0, crop
    return 0, int(rng.integers(0, -space + 1)), length


def place_on_canvas(pixels: np.ndarray, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """Normalise the part of a uint8 HWC image that lands in a size x size crop; zeros elsewhere."""
    height, width = pixels.shape[:2]
    src_y, dst_y, h = crop_offsets(height, size, rng)
    src_x, dst_x, w = crop_offsets(width, size, rng)
    canvas = np.zeros((3, size, size), dtype=np.float32)
    # Normalising only the kept region is the same as normalising first and cropping after.
    canvas[:, dst_y:dst_y + h, dst_x:dst_x + w] = normalize(pixels[src_y:src_y + h, src_x:src_x + w])
    return torch.from_numpy(canvas)


class PackedImages(NamedTuple):
    """A uint8 sample (or batch, after the DataLoader's collate, which keeps NamedTuples): pixels (3, S, S)
    on a zero canvas, and the canvas box (top, left, height, width) that holds image pixels. Workers hand
    these over (a quarter of float32's bytes); normalize_packed() finishes them on the device."""

    pixels: torch.Tensor
    boxes: torch.Tensor


def pack_on_canvas(pixels: np.ndarray, size: int, rng: np.random.Generator | None) -> PackedImages:
    """place_on_canvas's crop and pad in uint8, the normalisation left for later: the same draws from rng."""
    height, width = pixels.shape[:2]
    src_y, dst_y, h = crop_offsets(height, size, rng)
    src_x, dst_x, w = crop_offsets(width, size, rng)
    canvas = np.zeros((3, size, size), dtype=np.uint8)
    canvas[:, dst_y:dst_y + h, dst_x:dst_x + w] = pixels[src_y:src_y + h, src_x:src_x + w].transpose(2, 0, 1)
    return PackedImages(torch.from_numpy(canvas), torch.tensor([dst_y, dst_x, h, w], dtype=torch.int32))


def normalize_packed(packed: PackedImages) -> torch.Tensor:
    """(B, 3, S, S) float32 from a packed batch, wherever its tensors are (the training device): the same
    arithmetic as normalize() in float32, and exact zeros outside each image's box, as place_on_canvas pads."""
    pixels, boxes = packed
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    scale = torch.tensor(1.0 / 255.0, dtype=torch.float32, device=pixels.device)  # np.float32(1 / 255), as normalize()
    out = pixels.float().mul_(scale).sub_(mean).div_(std)  # in place: one float32 batch allocated
    rows = torch.arange(pixels.shape[-2], device=pixels.device)
    cols = torch.arange(pixels.shape[-1], device=pixels.device)
    top, left, height, width = (boxes[:, i, None] for i in range(4))
    inside = (((rows >= top) & (rows < top + height))[:, :, None] & ((cols >= left) & (cols < left + width))[:, None])
    return out.masked_fill_(~inside[:, None], 0.0)


def _rgb_pixels(img: Image.Image) -> Image.Image:  # convert() copies even an RGB image
    return img if img.mode == "RGB" else img.convert("RGB")


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if int(value) != value or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")


class ColorJitter:
    """torchvision's ColorJitter on a PIL image, its factors and order drawn from a numpy Generator.

    The draws follow ColorJitter.get_params: a random order of (brightness, contrast, saturation,
    hue), then each factor uniform in its range; the adjust_* functions are torchvision's own.
    """

    _ADJUSTERS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3, hue: float = 0.1):
        self.strengths = (brightness, contrast, saturation, hue)
        # torchvision's ranges for scalar arguments: [max(0, 1 - x), 1 + x], and [-hue, hue].
        self.ranges: tuple[tuple[float, float], ...] = (
            *((max(0.0, 1 - x), 1 + x) for x in (brightness, contrast, saturation)), (-hue, hue))

    def get_params(self, rng: np.random.Generator) -> tuple[list[int], list[float]]:
        """(order of the four adjustments as indices, [brightness, contrast, saturation, hue] factors)."""
        order = [int(i) for i in rng.permutation(4)]
        return order, [float(rng.uniform(low, high)) for low, high in self.ranges]

    @classmethod
    def apply(cls, img: Image.Image, order: list[int], factors: list[float]) -> Image.Image:
        for index in order:
            img = cls._ADJUSTERS[index](img, factors[index])
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return self.apply(img, *self.get_params(rng))

    def __repr__(self) -> str:
        b, c, s, h = self.strengths
        return f"ColorJitter(brightness={b}, contrast={c}, saturation={s}, hue={h})"


def photometric_augmentations(augment: str) -> list[ColorJitter | RandAugmentMC]:
    """The PIL-stage augmentations an --augment value names, in the reference's order."""
    if augment not in AUGMENT_CHOICES:
        valid = ", ".join(repr(choice) for choice in AUGMENT_CHOICES)
        raise UserError(f"unknown --augment {augment!r}; valid values: {valid}")
    steps: list[ColorJitter | RandAugmentMC] = []
    if "colorjitter" in augment:
        steps.append(ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1))
    if "randaugment" in augment:
        steps.append(RandAugmentMC(n=2, m=10))
    return steps


class TrainTransform:
    """Long side uniform in [min_size, max_size] (bicubic), flip p=0.5, optional colour jitter and
    RandAugment on the PIL image, normalise, random crop with 0 pad.

    packed=True: the crop and pad in uint8, returned as PackedImages for normalize_packed() on the device
    (the training loader's form); False: the normalised float32 tensor (the original path, kept for tools,
    tests and benchmarks/input_pipeline.py). Both consume the generator identically.
    """

    def __init__(self, image_size: int, min_size: int, max_size: int, augment: str = "", packed: bool = False):
        _check_sizes(image_size=image_size, min_size=min_size, max_size=max_size)
        if min_size > max_size:
            raise UserError(f"the minimum resize size ({min_size}) is larger than the maximum ({max_size})")
        self.image_size, self.min_size, self.max_size = int(image_size), int(min_size), int(max_size)
        self.augment, self.packed = augment, packed
        self.augmentations = photometric_augmentations(augment)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor | PackedImages:
        if rng is None:
            raise ValueError("TrainTransform needs a numpy Generator: give the dataset (index, seed) keys")
        size = random_long_side_size(img.width, img.height, self.min_size, self.max_size, rng)
        img = _rgb_pixels(img).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for augmentation in self.augmentations:  # PIL stage: after resize and flip, before normalising
            img = augmentation(img, rng)
        pixels = np.asarray(img)
        if self.packed:
            return pack_on_canvas(pixels, self.image_size, rng)
        return place_on_canvas(pixels, self.image_size, rng)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.image_size}, min_size={self.min_size}, "
                f"max_size={self.max_size}, augment={self.augment!r}" + (", packed=True)" if self.packed else ")"))


class EvalTransform:
    """Normalise, then keep the top-left image_size x image_size window, zero-padded (reference protocol).

    With fit_long_side, the image is first resized (bicubic) so that its long side is image_size: the whole
    image is seen, as COCO's 448 px protocol needs (its images are up to 640 px).
    """

    def __init__(self, image_size: int, fit_long_side: bool = False):
        _check_sizes(image_size=image_size)
        self.image_size, self.fit_long_side = int(image_size), fit_long_side

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        img = _rgb_pixels(img)
        if self.fit_long_side:
            img = img.resize(long_side_size(img.width, img.height, self.image_size), Image.BICUBIC)
        return place_on_canvas(np.asarray(img), self.image_size, None)

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, fit_long_side={self.fit_long_side})"
