"""Image files and the one torch Dataset behind every dataset format: (image tensor, labels, index).

Decoding is strict (a truncated file is an error, not a grey image), and every problem raises
`BadImageError`, a `UserError` naming the file, so that a run stops with one line or skips it.
"""
from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tools.errors import UserError


class BadImageError(UserError):
    """An image file that cannot be decoded completely (truncated, corrupt, not an image)."""


def short_name(path: Path) -> str:
    """'JPEGImages/x.jpg': enough to find the file under the dataset root, short enough for one line."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        # PIL's convert would clip 16-bit values at 255 (a white image): rescale to 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
    return img.convert("RGB")


# What PIL raises on broken files varies with the format and the kind of damage.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
                  Image.DecompressionBombError)


def load_rgb_image(path: Path) -> Image.Image:
    """Decode an image file completely and return it in RGB.

    Any format PIL reads works whatever the file extension. EXIF orientation is ignored on purpose:
    VOC boxes refer to the stored pixels. A missing, truncated or corrupt file raises BadImageError.
    """
    path = Path(path)
    where = short_name(path)
    try:
        with Image.open(path) as img:
            img.load()  # full decode now, so truncation shows here and not inside a transform
            return _to_rgb(img)
    except FileNotFoundError:
        raise BadImageError(f"{where} does not exist; re-download it or pass --skip_bad_images") from None
    except _DECODE_ERRORS as exc:
        raise BadImageError(f"{where} is truncated or not an image ({exc}); re-download it or pass "
                            f"--skip_bad_images") from None


Transform = Callable[[Image.Image, "np.random.Generator | None"], torch.Tensor]


def _parse_key(key: object) -> tuple[int, int | None]:
    """`index` or `(index, aug_seed)`."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise TypeError(f"expected an index or (index, aug_seed), got {key!r}")
        index, seed = key
        return int(index), (None if seed is None else int(seed))
    return int(key), None  # type: ignore[call-overload]


class MultiLabelImages(torch.utils.data.Dataset):
    """(image tensor, labels (C,), index) per image file; the same for VOC, COCO and list datasets.

    A key is an index or `(index, aug_seed)`; with a seed the transform receives
    `np.random.default_rng(aug_seed)`, so an augmented sample is a pure function of its seed. With
    `skip_bad_images`, an unreadable image is replaced by the next readable one ((index + 1) % len,
    and so on) and the returned index is the one actually used.
    """

    def __init__(self, image_paths: Sequence[str | Path], labels: np.ndarray, transform: Transform,
                 skip_bad_images: bool = False) -> None:
        if len(image_paths) != len(labels):
            raise ValueError(f"{len(image_paths)} image paths but {len(labels)} label rows")
        self.image_paths = [str(p) for p in image_paths]
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._bad: set[int] = set()  # per process (each DataLoader worker keeps its own)

    def __len__(self) -> int:
        return len(self.image_paths)

    def _load_readable(self, index: int) -> tuple[Image.Image, int]:
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if candidate in self._bad:
                continue
            try:
                return load_rgb_image(Path(self.image_paths[candidate])), candidate
            except BadImageError as exc:
                if not self.skip_bad_images:
                    raise
                self._bad.add(candidate)
                warnings.warn(f"skipping bad image: {exc}", stacklevel=3)
        raise UserError(f"none of the {len(self)} images of the split can be decoded")

    def __getitem__(self, key: int | tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
        index, seed = _parse_key(key)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, used = self._load_readable(index)
        rng = None if seed is None else np.random.default_rng(seed)
        return self.transform(image, rng), self.labels[used].clone(), used
