"""The synthetic VOC-format demo dataset: determinism, layout, labels, boxes, caching."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.demo_data import (
    CLASS_STYLES,
    MARKER_NAME,
    default_demo_root,
    generate_demo_dataset,
    main,
)
from tools.errors import UserError
from tools.voc import (
    NUM_CLASSES,
    VOC_CLASSES,
    labels_matrix,
    load_split,
    parse_annotation,
    read_split_file,
    resolve_voc_root,
)

TINY = {"num_train": 20, "num_val": 6, "min_side": 64, "max_side": 96, "seed": 3}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("demo") / "voc", **TINY)


def test_same_arguments_give_identical_bytes(tiny, tmp_path):
    again = generate_demo_dataset(tmp_path / "again", **TINY)
    assert tree_digests(tiny) == tree_digests(again)
    other = generate_demo_dataset(tmp_path / "other", **{**TINY, "seed": 4})
    assert digest(other / "JPEGImages" / "demo_000001.jpg") != digest(tiny / "JPEGImages" / "demo_000001.jpg")


def test_image_depends_only_on_seed_and_index(tiny, tmp_path):
    longer = generate_demo_dataset(tmp_path / "longer", **{**TINY, "num_train": 22})
    name = "JPEGImages/demo_000005.jpg"
    assert digest(longer / name) == digest(tiny / name)


def test_layout_and_counts(tiny):
    main_dir = tiny / "ImageSets" / "Main"
    train, val = read_split_file(main_dir / "train.txt"), read_split_file(main_dir / "val.txt")
    assert train == [f"demo_{k:06d}" for k in range(1, 21)]
    assert val == [f"demo_{k:06d}" for k in range(21, 27)]
    assert len(list((tiny / "JPEGImages").glob("*.jpg"))) == 26
    assert len(list((tiny / "Annotations").glob("*.xml"))) == 26
    assert resolve_voc_root(tiny) == tiny.resolve()
    assert json.loads((tiny / MARKER_NAME).read_text())["num_train"] == 20
    assert not list(tiny.parent.glob(".voc.*"))  # no temp folder left behind


def test_objects_boxes_and_sizes(tiny):
    for xml in sorted((tiny / "Annotations").glob("*.xml")):
        ann = parse_annotation(xml)
        names = [o.name for o in ann.objects]
        assert 1 <= len(names) <= 4 and len(set(names)) == len(names)
        assert ann.labels.sum() == len(names)
        with Image.open(tiny / "JPEGImages" / f"{xml.stem}.jpg") as img:
            width, height = img.size
            assert img.mode == "RGB"
        assert TINY["min_side"] <= max(width, height) <= TINY["max_side"]
        for obj in ann.objects:
            x0, y0, x1, y1 = obj.box
            assert 1 <= x0 < x1 <= width and 1 <= y0 < y1 <= height
            side = min(x1 - x0 + 1, y1 - y0 + 1) / min(width, height)
            assert 0.1 <= side <= 0.6


def test_masks_mark_the_drawn_shapes(tiny):
    """SegmentationClass: a VOC palette PNG per image, of its size; each label's pixels lie in that class's box
    and have that class's colour (the nearest of the 20); every object shows; the lists equal the main ones."""
    for kind in ("train", "val"):
        assert read_split_file(tiny / "ImageSets" / "Segmentation" / f"{kind}.txt") == \
            read_split_file(tiny / "ImageSets" / "Main" / f"{kind}.txt")
    for xml in sorted((tiny / "Annotations").glob("*.xml")):
        ann = parse_annotation(xml)
        with Image.open(tiny / "SegmentationClass" / f"{xml.stem}.png") as png:
            assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC colour of label 1
            mask = np.array(png)
        pixels = np.asarray(Image.open(tiny / "JPEGImages" / f"{xml.stem}.jpg"), dtype=np.float32)
        assert mask.shape == pixels.shape[:2]
        boxes = {VOC_CLASSES.index(o.name): o.box for o in ann.objects}
        assert set(np.unique(mask).tolist()) == {0} | {c + 1 for c in boxes}
        height, width = mask.shape
        for c, (x0, y0, x1, y1) in boxes.items():
            ys, xs = np.nonzero(mask == c + 1)
            # parse_annotation clamps xmax/ymax to width-1/height-1 (the reference's rule): a shape touching
            # the right or bottom edge reaches one pixel past its parsed box
            x1, y1 = x1 + (x1 == width - 1), y1 + (y1 == height - 1)
            assert xs.min() >= x0 - 1 and xs.max() <= x1 - 1 and ys.min() >= y0 - 1 and ys.max() <= y1 - 1
            colour = np.median(pixels[mask == c + 1], axis=0)
            nearest = np.argmin([np.abs(colour - np.array(rgb)).sum() for _, rgb in CLASS_STYLES])
            assert nearest == c, (xml.stem, VOC_CLASSES[c], colour)


def test_every_class_in_train_and_loads_as_a_split(tiny):
    train = load_split(tiny, "main:train")
    assert (labels_matrix(train).sum(0) > 0).all()
    val = load_split(tiny, "main:val")
    assert labels_matrix(val).shape == (6, NUM_CLASSES)


def overlaps(box: tuple[int, int, int, int], x0: int, y0: int, x1: int, y1: int) -> bool:
    return box[0] <= x1 and x0 <= box[2] and box[1] <= y1 and y0 <= box[3]


def test_squares_have_their_class_colour(tiny):
    """The centre of a square is its class colour, unless an object drawn later covers it."""
    checked = 0
    for xml in sorted((tiny / "Annotations").glob("*.xml")):
        objects = parse_annotation(xml).objects
        pixels = np.asarray(Image.open(tiny / "JPEGImages" / f"{xml.stem}.jpg"), int)
        for k, obj in enumerate(objects):
            shape, colour = CLASS_STYLES[VOC_CLASSES.index(obj.name)]
            cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2  # 1-based
            covered = any(overlaps(o.box, cx - 1, cy - 1, cx + 1, cy + 1) for o in objects[k + 1:])
            if shape != "square" or covered:
                continue
            patch = pixels[cy - 2:cy + 1, cx - 2:cx + 1].reshape(-1, 3).mean(0)
            assert np.abs(patch - colour).max() < 30
            checked += 1
    assert checked > 0


def test_some_objects_are_difficult(tmp_path):
    root = generate_demo_dataset(tmp_path / "many", num_train=120, num_val=20, min_side=48, max_side=64)
    objects = [o for xml in (root / "Annotations").glob("*.xml") for o in parse_annotation(xml).objects]
    rate = np.mean([o.difficult for o in objects])
    assert 0.01 <= rate <= 0.12
    assert 1.8 <= len(objects) / 140 <= 3.2


def test_styles_are_distinct():
    assert len(set(CLASS_STYLES)) == NUM_CLASSES
    assert len({colour for _, colour in CLASS_STYLES}) == NUM_CLASSES


def test_same_arguments_reuse_and_new_arguments_rebuild(tmp_path):
    root = generate_demo_dataset(tmp_path / "cache", num_train=3, num_val=2)
    sentinel = root / "sentinel"
    sentinel.write_text("still here")
    assert generate_demo_dataset(tmp_path / "cache", num_train=3, num_val=2) == root
    assert sentinel.exists()  # nothing was regenerated
    generate_demo_dataset(tmp_path / "cache", num_train=4, num_val=2)
    assert not sentinel.exists()
    assert len(read_split_file(root / "ImageSets" / "Main" / "train.txt")) == 4
    assert json.loads((root / MARKER_NAME).read_text())["num_train"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # temp and old folders removed


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path):
    precious = tmp_path / "VOC2012"
    (precious / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError, match="not a demo dataset"):
        generate_demo_dataset(precious, num_train=2, num_val=1)
    assert (precious / "JPEGImages").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_demo_dataset(empty, num_train=2, num_val=1) == empty.absolute()


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        generate_demo_dataset(tmp_path / "x", num_train=0)
    with pytest.raises(UserError, match="min_side"):
        generate_demo_dataset(tmp_path / "x", min_side=100, max_side=90)


def test_default_root_follows_oass_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OASS_CACHE", str(tmp_path))
    assert default_demo_root() == tmp_path / "demo_voc"
    monkeypatch.delenv("OASS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_demo_root() == tmp_path / "home" / ".cache" / "oass" / "demo_voc"


def test_cli_prints_where_it_wrote(tmp_path, capsys):
    out = tmp_path / "cli"
    main(["--out", str(out), "--num_train", "3", "--num_val", "2", "--seed", "1"])
    printed = capsys.readouterr().out
    assert str(out) in printed and "main:train" in printed
    assert len(read_split_file(out / "ImageSets" / "Main" / "val.txt")) == 2
