"""The demo set in every dataset format, from the same generator as the VOC one (tools/demo_data.py).

    --demo / --demo voc   VOC layout (tools/demo_data.py)
    --demo coco           train2014/, val2014/, annotations/instances_{train,val}2014.json: the 20 demo classes
                          under their real COCO names and category ids, listed out of id order, plus a few
                          images without any annotation (left out by the COCO protocol)
    --demo list           classes.txt, train.csv (with a header line) and val.csv (without), images/ in sub-folders

Image k is the same picture in every format: a pure function of (seed, k).

    python -m tools.demo_formats --format coco --out DIR [--num_train N --num_val N --seed S]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tools import demo_data
from tools.demo_data import DemoObject, render_image
from tools.errors import UserError, run_cli
from tools.voc import NUM_CLASSES, VOC_CLASSES

DEMO_FORMATS: tuple[str, ...] = ("voc", "coco", "list")
FORMAT_VERSION = 1
# VOC class -> (COCO category id, COCO name): the real ids of the 20 VOC classes in COCO
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (5, "airplane"), (2, "bicycle"), (16, "bird"), (9, "boat"), (44, "bottle"), (6, "bus"), (3, "car"),
    (17, "cat"), (62, "chair"), (21, "cow"), (67, "dining table"), (18, "dog"), (19, "horse"),
    (4, "motorcycle"), (1, "person"), (64, "potted plant"), (20, "sheep"), (63, "couch"), (7, "train"),
    (72, "tv"),
)
UNLABELLED_EVERY = 40  # one image in 40 (at least one per split) carries no annotation in the COCO demo


def default_demo_root(kind: str = "voc") -> Path:
    """$OASS_CACHE/demo_<kind> (or ~/.cache/oass/demo_<kind>); demo_voc is tools/demo_data.py's folder."""
    return demo_data.default_demo_root().with_name(f"demo_{kind}")


def is_outdated_demo(root: Path, kind: str = "voc") -> bool:
    """A demo set written by an older version of its generator (its marker says so); False without a marker."""
    try:
        marker = json.loads((Path(root) / demo_data.MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False  # no marker: not a generated set, use it as it is
    if not isinstance(marker, dict):
        return False
    if kind == "voc":
        return marker.get("format_version") != demo_data.FORMAT_VERSION
    return (marker.get("format_version"), marker.get("voc_format_version")) != (FORMAT_VERSION,
                                                                                demo_data.FORMAT_VERSION)


def _samples(params: dict, start: int, count: int) -> Iterator[tuple[int, np.ndarray, list[DemoObject]]]:
    """Images start .. start+count-1 exactly as tools/demo_data.py draws them for its VOC splits."""
    schedule = np.random.default_rng([params["seed"], 1_000_003, start]).permutation(NUM_CLASSES)
    for k in range(start, start + count):
        rng = np.random.default_rng([params["seed"], k])
        first = int(schedule[(k - start) % NUM_CLASSES])
        pixels, objects = render_image(rng, first, params["min_side"], params["max_side"])[:2]  # not the mask
        yield k, pixels, objects


def _background(params: dict, k: int) -> np.ndarray:
    """An image without any class object (gradient and clutter only), for COCO's unannotated images."""
    rng = np.random.default_rng([params["seed"], 2_000_003, k])
    side = int(rng.integers(params["min_side"], params["max_side"] + 1))
    base = rng.uniform(60, 200, size=3)
    pixels = np.broadcast_to(base, (side, side, 3)) + rng.normal(0.0, 6.0, size=(side, side, 3))
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, side, size=4))
        draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.uniform(70, 190, size=3)), width=1)
    return np.asarray(image)


# ----------------------------------------------------------------------------- COCO
def _coco_split(folder: Path, params: dict, split: str, start: int, count: int, first_id: int) -> dict:
    """Write one split's images; return its instances dict."""
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    extra = max(1, count // UNLABELLED_EVERY)
    entries = [(pixels, objects) for _, pixels, objects in _samples(params, start, count)]
    entries += [(_background(params, start + j), []) for j in range(extra)]
    for position, (pixels, objects) in enumerate(entries):
        image_id = first_id + position
        file_name = f"COCO_{split}_{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / split / file_name, quality=95)
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            x0, y0, x1, y1 = obj.box  # VOC: 1-based inclusive -> COCO: 0-based x, y, w, h
            annotations.append({"id": first_id * 100 + len(annotations), "image_id": image_id,
                                "category_id": COCO_CATEGORIES[obj.class_index][0], "iscrowd": 0,
                                "bbox": [x0 - 1.0, y0 - 1.0, x1 - x0 + 1.0, y1 - y0 + 1.0],
                                "area": float((x1 - x0 + 1) * (y1 - y0 + 1)), "segmentation": []})
    images.reverse()  # not in id order, as nothing in the format promises it
    categories = [{"id": cid, "name": name, "supercategory": "demo"} for cid, name in COCO_CATEGORIES]
    return {"info": {"description": "OASS synthetic demo"}, "images": images, "annotations": annotations,
            "categories": categories}


def _write_coco(folder: Path, params: dict) -> None:
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    for split, start, count, first_id in (("train2014", 0, params["num_train"], 1),
                                          ("val2014", params["num_train"], params["num_val"], 500_001)):
        instances = _coco_split(folder, params, split, start, count, first_id)
        (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))


# ----------------------------------------------------------------------------- list
def _write_list(folder: Path, params: dict) -> None:
    (folder / "classes.txt").write_text("".join(name + "\n" for name in VOC_CLASSES))
    for split, start, count, header in (("train", 0, params["num_train"], True),
                                        ("val", params["num_train"], params["num_val"], False)):
        lines = ["image,labels"] if header else []
        for k, pixels, objects in _samples(params, start, count):
            relative = f"images/{split}/{k // 100:03d}/demo_{k + 1:06d}.jpg"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / relative, quality=95)
            names = list(dict.fromkeys(VOC_CLASSES[o.class_index] for o in objects))
            lines.append(f"{relative},{';'.join(names)}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- building a folder
def _build(root: Path, params: dict, writer) -> Path:
    """Build in a temp sibling folder and rename it into place (the VOC generator's recipe)."""
    if demo_data._read_marker(root) == params:
        return root
    demo_data._check_replaceable(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    demo_data._remove_stale_temps(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        writer(tmp, params)
        (tmp / demo_data.MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        demo_data._swap_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate_demo(kind: str = "voc", root: Path | None = None, num_train: int = 600, num_val: int = 200,
                  min_side: int = 96, max_side: int = 128, seed: int = 0) -> Path:
    """Write (or reuse) the demo set of `kind` (voc, coco, list) at `root` (default: the cache) and return it."""
    if kind not in DEMO_FORMATS:
        raise UserError(f"--demo {kind}: unknown format; choose one of {', '.join(DEMO_FORMATS)}")
    root = Path(root or default_demo_root(kind)).expanduser().absolute()
    if kind == "voc":
        return demo_data.generate_demo_dataset(root, num_train, num_val, min_side, max_side, seed)
    demo_data._check_params(num_train, num_val, min_side, max_side)
    params = {"format": kind, "format_version": FORMAT_VERSION, "voc_format_version": demo_data.FORMAT_VERSION,
              "num_train": int(num_train), "num_val": int(num_val), "min_side": int(min_side),
              "max_side": int(max_side), "seed": int(seed)}
    return _build(root, params, _write_coco if kind == "coco" else _write_list)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", default="voc", choices=DEMO_FORMATS)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the cache's demo_<format>)")
    parser.add_argument("--num_train", type=int, default=600)
    parser.add_argument("--num_val", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    root = generate_demo(args.format, args.out, args.num_train, args.num_val, seed=args.seed)
    print(f"{args.format} demo set ({args.num_train} train + {args.num_val} val images) at {root} "
          f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
