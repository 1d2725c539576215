"""The demo's stand-in for ImageNet: a resnet18 pretrained once on a generated single-label pretext set.

The real recipe fine-tunes an ImageNet backbone; the demo cannot download one, and from random weights
its CAMs stay noise for most of a short run. So `--pretrained demo` builds (once, cached) a resnet18
trained to name the **hue** of the one object in an image (10 classes, the demo's ten hue positions,
each drawn anywhere within its bin, light or dark), whatever its shape: the demo's five shapes or three
distractor shapes, on the demo's cluttered backgrounds. Its images come from a random stream of their
own (never a demo train or val image). It learns to find a coloured object on clutter and to tell hues
apart, not the demo's classes: a demo class is a (hue, brightness, shape) triple, two classes share
each hue, and a demo image holds up to four objects. So the demo still has to learn its classes, the way
ImageNet features still have to learn VOC's. (A shape-naming pretext reached 26% pretext accuracy in
the same budget, too little to help; hue reaches about 80% in a few hundred steps.)

Cached under $OASS_CACHE/demo_backbone (default ~/.cache/oass): `resnet18_demo_seed<S>.pth`, a
torchvision-format state dict (fc has `num_classes` outputs, recorded in the card) and
`resnet18_demo_seed<S>.json`, the card: seed, images, epochs, pretext accuracy, SHA-256. A file whose
hash does not match its card is rebuilt with a warning, never loaded.

    python -m tools.demo_backbone [--seed S] [--force]
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import fcntl
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image, ImageDraw

from tools.demo_data import SHAPES, _draw_clutter, _gradient, _shape_mask
from tools.errors import UserError, run_cli
from tools.files import atomic_write, cache_folder, file_sha256

FORMAT_VERSION = 2  # bump when the pretext or the training changes, so cached backbones are rebuilt
DISTRACTOR_SHAPES = ("diamond", "bar", "hexagon")
PRETEXT_SHAPES = (*SHAPES, *DISTRACTOR_SHAPES)
# the labels: hue bins centred on the demo's ten class hues (tools.demo_data: hue c % 10 / 10)
PRETEXT_CLASSES = ("red", "orange", "yellow", "chartreuse", "green", "cyan", "azure", "blue", "violet", "rose")
IMAGE_SIZE = 64  # objects of 18-48 px, the scale of the demo's objects after its 96-160 px resize
RECIPE = {"train_images": 4000, "test_images": 500, "epochs": 2, "batch_size": 32, "lr": 0.03,
          "momentum": 0.9, "wd": 5e-4, "image_size": IMAGE_SIZE}
_STREAM = 7_000_001  # the pretext's own random stream: the demo sets draw from [seed, k]
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # the training transforms' ImageNet normalisation
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


CACHE_WRITE_ADVICE = "free disk space or set OASS_CACHE to a writable folder"


def cache_dir() -> Path:
    return cache_folder("demo_backbone")


def backbone_paths(seed: int = 0) -> tuple[Path, Path]:
    """(state dict, card) of the cached backbone for `seed`."""
    stem = cache_dir() / f"resnet18_demo_seed{seed}"
    return stem.with_suffix(".pth"), stem.with_suffix(".json")


# ----------------------------------------------------------------------------------------------
# The pretext set


def _extra_shape_mask(shape: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Masks of the distractor shapes (the demo's own come from tools.demo_data)."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "bar":  # a thick bar, horizontal or vertical by the box's aspect
        if w >= h:
            draw.rectangle([x0, cy - h / 5, x1, cy + h / 5], fill=255)
        else:
            draw.rectangle([cx - w / 5, y0, cx + w / 5, y1], fill=255)
    elif shape == "hexagon":
        angles = np.deg2rad(np.arange(6) * 60.0)
        draw.polygon([(cx + w / 2 * np.cos(a), cy + h / 2 * np.sin(a)) for a in angles], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 0


def render_pretext_image(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[np.ndarray, int]:
    """One uint8 size x size x 3 image with one object, and its label (an index into PRETEXT_CLASSES)."""
    label = int(rng.integers(len(PRETEXT_CLASSES)))
    background = Image.fromarray(np.clip(_gradient(rng, size, size), 0, 255).astype(np.uint8))
    _draw_clutter(background, rng)
    pixels = np.asarray(background, dtype=np.float32).copy()
    side = rng.uniform(0.28, 0.75) * size
    aspect = rng.uniform(0.8, 1.25)
    w, h = max(6, round(side * np.sqrt(aspect))), max(6, round(side / np.sqrt(aspect)))
    x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
    box = (x0, y0, x0 + w, y0 + h)
    shape = PRETEXT_SHAPES[int(rng.integers(len(PRETEXT_SHAPES)))]
    mask = _shape_mask(shape, (size, size), box) if shape in SHAPES else _extra_shape_mask(shape, (size, size), box)
    # anywhere in the hue's bin, from dark to bright: the demo's light and dark class colours both fall inside
    hue = (label + rng.uniform(-0.3, 0.3)) / len(PRETEXT_CLASSES) % 1.0
    colour = np.asarray(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.45, 1.0)), np.float32) * 255
    pixels[mask] = colour + rng.uniform(-12, 12, size=3)
    pixels += rng.normal(0.0, 5.0, size=pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), label


def pretext_set(seed: int, start: int, count: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Images start .. start+count-1 of the pretext stream as (N, 3, size, size) uint8 and (N,) labels;
    image k is a pure function of (seed, k)."""
    images, labels = [], []
    for k in range(start, start + count):
        image, label = render_pretext_image(np.random.default_rng([seed, _STREAM, k]), size)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255.0 - _MEAN) / _STD


# ----------------------------------------------------------------------------------------------
# Pretraining


def pretrain(seed: int = 0, recipe: dict | None = None, log=print) -> tuple[dict, dict]:
    """Train resnet18 on the pretext set; returns (state dict, card without the hash)."""
    recipe = {**RECIPE, **(recipe or {})}
    start = time.perf_counter()
    torch.manual_seed(seed)
    train_x, train_y = pretext_set(seed, 0, recipe["train_images"], recipe["image_size"])
    test_x, test_y = pretext_set(seed, recipe["train_images"], recipe["test_images"], recipe["image_size"])
    model = tvm.resnet18(weights=None, num_classes=len(PRETEXT_CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                weight_decay=recipe["wd"], nesterov=True)
    steps_per_epoch = len(train_x) // recipe["batch_size"]
    total = recipe["epochs"] * steps_per_epoch
    generator = torch.Generator().manual_seed(seed)
    step = 0
    model.train()
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps_per_epoch):
            for group in optimizer.param_groups:  # cosine to zero: a short run ends settled
                group["lr"] = recipe["lr"] * 0.5 * (1 + np.cos(np.pi * step / total))
            index = order[i * recipe["batch_size"]:(i + 1) * recipe["batch_size"]]
            images = _normalise(train_x[index])
            flip = torch.rand(len(index), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            loss = F.cross_entropy(model(images), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        log(f"demo backbone: epoch {epoch + 1}/{recipe['epochs']} loss {loss.item():.3f} "
            f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(_normalise(test_x[i:i + 256])).argmax(1) for i in range(0, len(test_x), 256)])
    accuracy = float((predictions == test_y).float().mean() * 100)
    card = {"format_version": FORMAT_VERSION, "architecture": "resnet18", "seed": seed,
            "num_classes": len(PRETEXT_CLASSES), "classes": list(PRETEXT_CLASSES), "recipe": recipe,
            "images": recipe["train_images"], "epochs": recipe["epochs"], "pretext_test_images": recipe["test_images"],
            "pretext_accuracy": round(accuracy, 2), "chance_accuracy": round(100 / len(PRETEXT_CLASSES), 2),
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    return model.state_dict(), card


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _cached_state(seed: int) -> dict | None:
    """The cached state dict when its card matches this code and its hash; None (with a warning for a damaged
    file) otherwise."""
    weights, card_path = backbone_paths(seed)
    if not weights.exists() and not card_path.exists():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        _warn(f"demo backbone card {card_path} is missing or unreadable; rebuilding the demo backbone")
        return None
    if card.get("format_version") != FORMAT_VERSION or card.get("seed") != seed:
        return None  # made by another version of this module: rebuilt silently, it is not damage
    try:
        if file_sha256(weights) != card.get("sha256"):
            _warn(f"demo backbone {weights} does not match the SHA-256 in its card (damaged or replaced); rebuilding")
            return None
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing, truncated, not a state dict
        _warn(f"demo backbone {weights} is not readable ({type(exc).__name__}); rebuilding")
        return None


@contextlib.contextmanager
def _build_lock(folder: Path):
    """One builder at a time (torchrun ranks, parallel runs): the others wait, then find it cached."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def demo_backbone_state(seed: int = 0, force: bool = False, log=print) -> dict:
    """The demo backbone's state dict: from the cache, or pretrained now (about 2 minutes on 2 cores) and cached."""
    weights, card_path = backbone_paths(seed)
    with _build_lock(weights.parent):
        state = None if force else _cached_state(seed)
        if state is not None:
            return state
        log(f"demo backbone: pretraining resnet18 on the pretext set (once; cached in {weights.parent})")
        with torch.random.fork_rng():  # the run's own random state is untouched by the build
            state, card = pretrain(seed, log=log)
        card["sha256"] = atomic_write(weights, lambda f: torch.save(state, f), CACHE_WRITE_ADVICE, hashed=True)
        text = (json.dumps(card, indent=2) + "\n").encode()
        atomic_write(card_path, lambda f: f.write(text), CACHE_WRITE_ADVICE)
        log(f"demo backbone: pretext accuracy {card['pretext_accuracy']:.1f}% (chance {card['chance_accuracy']:.1f}%) "
            f"in {card['seconds']:.0f} s; saved {weights}")
        return state


def read_card(seed: int = 0) -> dict | None:
    try:
        return json.loads(backbone_paths(seed)[1].read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even when a valid cached backbone exists")
    args = parser.parse_args(argv)
    if args.seed < 0:
        raise UserError(f"--seed must not be negative, got {args.seed}")
    demo_backbone_state(args.seed, args.force)
    print(json.dumps(read_card(args.seed), indent=2))


if __name__ == "__main__":
    run_cli(main)
