"""A small synthetic dataset in VOC layout, for the quick start, the smoke tests and CPU demos.

Each VOC class is a (shape, colour) pair drawn on a cluttered background: 20 well-separated
colours (10 hues, bright and dark), 5 shapes, so that a randomly initialised resnet18 learns it in
minutes on a CPU, while objects are small enough (20-45% of the short side) for localisation to
matter. Every image has a segmentation mask (SegmentationClass/, VOC palette; no 255 borders) and
is listed in ImageSets/Segmentation too, so the CAM tools (make_cams.py, evaluate_cams.py) run on it.
Output is a pure function of the arguments: image k depends only on (seed, k).

    python -m tools.demo_data --out DIR [--num_train N --num_val N --seed S]
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tools.cam_metrics import palette_image
from tools.errors import UserError, run_cli
from tools.files import cache_folder
from tools.voc import NUM_CLASSES, VOC_CLASSES

MARKER_NAME = ".oass_demo.json"
FORMAT_VERSION = 2  # bump when the drawing or the files change, so cached datasets are rebuilt (2: masks)
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "plus", "ring")
_HUES = 10


def _class_style(c: int) -> tuple[str, tuple[int, int, int]]:
    """Class c: hue c % 10, bright for the first ten classes and dark for the others, shape from c.

    Colour and shape both point at the class (classes sharing a hue differ in shape), which makes
    the demo learn in minutes from random weights without two classes looking alike.
    """
    saturation, value = (0.85, 0.95) if c < _HUES else (0.95, 0.55)
    red, green, blue = (round(255 * v) for v in colorsys.hsv_to_rgb((c % _HUES) / _HUES, saturation, value))
    return SHAPES[(c + c // _HUES) % len(SHAPES)], (red, green, blue)


CLASS_STYLES: tuple[tuple[str, tuple[int, int, int]], ...] = tuple(map(_class_style, range(NUM_CLASSES)))
_MIN_VISIBLE = 0.7  # an earlier object keeps at least this fraction of its pixels visible
_PLACEMENT_TRIES = 30
_DIFFICULT_RATE = 0.05
_STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class DemoObject:
    class_index: int
    box: tuple[int, int, int, int]  # VOC convention: 1-based inclusive xmin, ymin, xmax, ymax
    difficult: bool


# ----------------------------------------------------------------------------------------------
# Drawing one image


def _image_size(rng: np.random.Generator, min_side: int, max_side: int) -> tuple[int, int]:
    long_side = int(rng.integers(min_side, max_side + 1))
    short_side = max(16, round(long_side * rng.uniform(0.65, 1.0)))
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _muted_colour(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A random colour pulled toward grey, so background clutter never matches a class colour."""
    colour = rng.uniform(40, 215, size=3)
    grey = colour.mean()
    return grey + (colour - grey) * strength


def _gradient(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Bilinear blend of four muted corner colours, float HWC."""
    corners = np.stack([_muted_colour(rng, 0.35) for _ in range(4)])
    ys = np.linspace(0.0, 1.0, height)[:, None, None]
    xs = np.linspace(0.0, 1.0, width)[None, :, None]
    top = corners[0] * (1 - xs) + corners[1] * xs
    bottom = corners[2] * (1 - xs) + corners[3] * xs
    return top * (1 - ys) + bottom * ys


def _draw_clutter(image: Image.Image, rng: np.random.Generator) -> None:
    """Thin lines and small blobs: distractors that are not class shapes (thin, tiny, muted)."""
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = rng.integers(0, width, size=2)
        y0, y1 = rng.integers(0, height, size=2)
        fill = tuple(int(v) for v in _muted_colour(rng, 0.3))
        draw.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=fill, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(4, 13))):
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        rx, ry = (int(v) for v in rng.integers(1, 4, size=2))
        fill = tuple(int(v) for v in _muted_colour(rng, 0.4))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)


def _shape_mask(shape: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Boolean mask of one shape filling the box (x0, y0, x1, y1), inclusive pixel corners."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(x0 + w / 2, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "plus":
        tx, ty = w / 3, h / 3
        draw.rectangle([x0 + tx, y0, x1 - tx, y1], fill=255)
        draw.rectangle([x0, y0 + ty, x1, y1 - ty], fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        inset_x, inset_y = w * 0.3, h * 0.3
        draw.ellipse([x0 + inset_x, y0 + inset_y, x1 - inset_x, y1 - inset_y], fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(mask) > 0


def _random_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    side = rng.uniform(0.20, 0.45) * min(width, height)
    aspect = rng.uniform(0.8, 1.25)
    w = max(6, round(side * np.sqrt(aspect)))
    h = max(6, round(side / np.sqrt(aspect)))
    w, h = min(w, width - 1), min(h, height - 1)
    x0 = int(rng.integers(0, width - w))
    y0 = int(rng.integers(0, height - h))
    return x0, y0, x0 + w, y0 + h


def _mostly_visible(mask: np.ndarray, visible: list[np.ndarray], areas: list[int]) -> bool:
    """Would drawing `mask` on top keep every earlier object at least _MIN_VISIBLE visible?"""
    return all((v & ~mask).sum() >= _MIN_VISIBLE * a for v, a in zip(visible, areas))


def _place_objects(rng: np.random.Generator, size: tuple[int, int],
                   classes: list[int]) -> list[tuple[int, np.ndarray]]:
    """(class, mask) in drawing order; an object that finds no free spot is left out (never the first)."""
    placed: list[tuple[int, np.ndarray]] = []
    visible: list[np.ndarray] = []
    areas: list[int] = []
    for cls in classes:
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(CLASS_STYLES[cls][0], size, _random_box(rng, *size))
            if _mostly_visible(mask, visible, areas):
                visible = [v & ~mask for v in visible] + [mask]
                areas.append(int(mask.sum()))
                placed.append((cls, mask))
                break
    return placed


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


def _choose_classes(rng: np.random.Generator, first: int) -> list[int]:
    """1-4 distinct classes; `first` comes from a schedule that covers every class."""
    count = int(rng.integers(1, 5))
    others = [c for c in rng.permutation(NUM_CLASSES).tolist() if c != first]
    return [first] + others[:count - 1]


def render_image(rng: np.random.Generator, first_class: int, min_side: int,
                 max_side: int) -> tuple[np.ndarray, list[DemoObject], np.ndarray]:
    """One uint8 HWC image, its objects and its segmentation (uint8 HW: 0 background, class + 1 where the
    object is visible, later objects covering earlier ones as drawn)."""
    width, height = _image_size(rng, min_side, max_side)
    background = Image.fromarray(np.clip(_gradient(rng, width, height), 0, 255).astype(np.uint8))
    _draw_clutter(background, rng)
    pixels = np.asarray(background, dtype=np.float32).copy()
    segmentation = np.zeros((height, width), np.uint8)
    objects = []
    for cls, mask in _place_objects(rng, (width, height), _choose_classes(rng, first_class)):
        colour = np.asarray(CLASS_STYLES[cls][1], np.float32) + rng.uniform(-12, 12, size=3)
        pixels[mask] = colour
        segmentation[mask] = cls + 1
        objects.append(DemoObject(cls, _tight_box(mask), bool(rng.random() < _DIFFICULT_RATE)))
    pixels += rng.normal(0.0, 5.0, size=pixels.shape)  # sensor-like noise over everything
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), objects, segmentation


# ----------------------------------------------------------------------------------------------
# Writing the dataset


def _annotation_xml(image_id: str, width: int, height: int, objects: list[DemoObject]) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2012"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "OASS synthetic demo"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "1"
    for obj in objects:
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = VOC_CLASSES[obj.class_index]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = "1" if obj.difficult else "0"
        box = ET.SubElement(node, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), obj.box):
            ET.SubElement(box, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def _write_sample(folder: Path, image_id: str, pixels: np.ndarray, objects: list[DemoObject],
                  segmentation: np.ndarray) -> None:
    Image.fromarray(pixels).save(folder / "JPEGImages" / f"{image_id}.jpg", quality=95)
    palette_image(segmentation).save(folder / "SegmentationClass" / f"{image_id}.png")
    height, width = pixels.shape[:2]
    _annotation_xml(image_id, width, height, objects).write(folder / "Annotations" / f"{image_id}.xml",
                                                             encoding="utf-8")


def _write_split(folder: Path, params: dict, name: str, start: int, count: int) -> None:
    """Images start+1 .. start+count; the first class of image k cycles through a class permutation."""
    seed = params["seed"]
    schedule = np.random.default_rng([seed, 1_000_003, start]).permutation(NUM_CLASSES)
    ids = []
    for k in range(start, start + count):
        image_id = f"demo_{k + 1:06d}"
        rng = np.random.default_rng([seed, k])  # image k is a pure function of (seed, k)
        first = int(schedule[(k - start) % NUM_CLASSES])
        pixels, objects, segmentation = render_image(rng, first, params["min_side"], params["max_side"])
        _write_sample(folder, image_id, pixels, objects, segmentation)
        ids.append(image_id)
    for kind in ("Main", "Segmentation"):  # every demo image has a mask: the same ids in both lists
        (folder / "ImageSets" / kind / f"{name}.txt").write_text("".join(i + "\n" for i in ids))


def _write_dataset(folder: Path, params: dict) -> None:
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    _write_split(folder, params, "train", 0, params["num_train"])
    _write_split(folder, params, "val", params["num_train"], params["num_val"])
    # Written last: its presence means the folder is complete.
    (folder / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def _check_replaceable(root: Path) -> None:
    """Refuse to delete a folder this module did not make (a real VOC folder passed as --out, say)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"--out {root} is a file; choose a folder for the demo dataset")
    if (root / MARKER_NAME).exists() or not any(root.iterdir()):
        return
    raise UserError(f"--out {root} exists and is not a demo dataset (no {MARKER_NAME}); "
                    f"choose an empty or new folder")


def _remove_stale_temps(root: Path) -> None:
    """Temp folders left by a killed run (older than an hour) would otherwise pile up in the cache."""
    now = time.time()
    leftovers = [*root.parent.glob(f".{root.name}.tmp-*"), *root.parent.glob(f".{root.name}.old-*")]
    for old in leftovers:
        try:
            if old.is_dir() and now - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _swap_into_place(tmp: Path, root: Path, params: dict) -> None:
    """Rename the finished temp folder onto root, moving any older dataset out of the way first."""
    if _read_marker(root) == params:
        return  # a concurrent run built the same dataset meanwhile: keep it, ours is discarded
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex}")
    if root.exists():
        try:
            os.rename(root, old)
        except FileNotFoundError:
            pass  # another process moved it already
    try:
        os.rename(tmp, root)
    except OSError:
        # A concurrent run finished first: fine if it built the same thing.
        if _read_marker(root) != params:
            raise
    shutil.rmtree(old, ignore_errors=True)


def _check_params(num_train: int, num_val: int, min_side: int, max_side: int) -> None:
    if num_train < 1 or num_val < 1:
        raise UserError(f"--num_train and --num_val must be at least 1 (got {num_train} and {num_val})")
    if not 32 <= min_side <= max_side:
        raise UserError(f"image sides must satisfy 32 <= min_side <= max_side (got {min_side}, {max_side})")


def generate_demo_dataset(root: Path, num_train: int = 600, num_val: int = 200, min_side: int = 96,
                          max_side: int = 128, seed: int = 0) -> Path:
    """Write (or reuse) the demo dataset at `root` and return `root`.

    root/JPEGImages, root/Annotations, root/SegmentationClass (VOC palette PNGs),
    root/ImageSets/{Main,Segmentation}/{train,val}.txt, built in a temp
    sibling folder and renamed into place. root/.oass_demo.json records the arguments: a call with
    the same arguments returns at once; different ones rebuild the folder.
    """
    root = Path(root).expanduser().absolute()
    params = {"format_version": FORMAT_VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "min_side": int(min_side), "max_side": int(max_side), "seed": int(seed)}
    if _read_marker(root) == params:
        return root
    _check_params(params["num_train"], params["num_val"], params["min_side"], params["max_side"])
    _check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        _write_dataset(tmp, params)
        _swap_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def default_demo_root() -> Path:
    """$OASS_CACHE/demo_voc when OASS_CACHE is set, else ~/.cache/oass/demo_voc."""
    return cache_folder("demo_voc")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $OASS_CACHE/demo_voc or ~/.cache/oass/demo_voc)")
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_val", type=int, default=200)
    parser.add_argument("--min_side", type=int, default=96)
    parser.add_argument("--max_side", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate_demo_dataset(args.out or default_demo_root(), args.num_train, args.num_val,
                                 args.min_side, args.max_side, args.seed)
    print(f"demo dataset ({args.num_train} train + {args.num_val} val images) at {root} "
          f"({time.perf_counter() - start:.1f} s); use --data_dir {root} with splits main:train / main:val")


if __name__ == "__main__":
    run_cli(main)
