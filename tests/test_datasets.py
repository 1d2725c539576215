"""The dataset layer (tools/datasets.py): VOC2012/2007, COCO 2014 and list folders, the COCO label cache,
layout detection, check_dataset's report, and every bad input as one line naming the file."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tool_calls import call

from tools import coco
from tools.check_dataset import main as check_main
from tools.datasets import default_splits, detect_dataset, open_dataset, resolve_dataset
from tools.demo_formats import COCO_CATEGORIES, generate_demo
from tools.errors import UserError
from tools.voc import VOC_CLASSES, parse_annotation

TINY = dict(num_train=16, num_val=10, min_side=48, max_side=64, seed=1)  # the conftest VOC set's images


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory) -> Path:
    return generate_demo("coco", tmp_path_factory.mktemp("coco") / "tiny", **TINY)


@pytest.fixture(scope="module")
def tiny_list(tmp_path_factory) -> Path:
    return generate_demo("list", tmp_path_factory.mktemp("list") / "tiny", **TINY)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OASS_CACHE", str(tmp_path / "cache"))


def copy(folder: Path, tmp_path: Path, name: str = "data") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def raises(fn, *words: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- loading each format
def test_coco_labels_follow_the_json(tiny_coco):
    """Labels rebuilt here with the json module: categories in id order, unannotated images left out."""
    for split in default_splits("coco2014"):
        data = json.loads((tiny_coco / "annotations" / f"instances_{split}.json").read_text())
        ids = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        per_image: dict[int, set[int]] = {}
        for ann in data["annotations"]:
            per_image.setdefault(ann["image_id"], set()).add(ids.index(ann["category_id"]))
        images = sorted(data["images"], key=lambda im: im["id"])
        labelled = [im for im in images if im["id"] in per_image]
        got = open_dataset("coco2014", tiny_coco, split)
        assert got.class_names == tuple(names[i] for i in ids) and got.class_names[:3] == ("person", "bicycle", "car")
        assert got.names == [im["file_name"] for im in labelled]
        assert len(labelled) < len(images) and any(str(len(images) - len(labelled)) in n for n in got.notes)
        want = np.zeros((len(labelled), len(ids)), np.float32)
        for row, im in enumerate(labelled):
            want[row, sorted(per_image[im["id"]])] = 1
        np.testing.assert_array_equal(got.labels, want)
        assert not got.ignore.any() and all(p.is_file() for p in got.image_paths)
        kept = open_dataset("coco2014", tiny_coco, split, keep_unlabelled=True)
        assert len(kept.names) == len(images) and kept.labels.sum() == want.sum()


def test_every_format_holds_the_same_labelled_images(tiny_voc, tiny_coco, tiny_list):
    """One generator: the VOC, COCO and list demo sets hold the same pictures with the same labels."""
    voc = open_dataset("voc2012", tiny_voc, "main:val")
    listed = open_dataset("list", tiny_list, "val")
    cocoset = open_dataset("coco2014", tiny_coco, "val2014")
    assert listed.class_names == VOC_CLASSES
    np.testing.assert_array_equal(listed.labels, voc.labels)
    # COCO: the same classes under COCO names, columns in category-id order
    order = np.argsort([cid for cid, _ in COCO_CATEGORIES])
    assert cocoset.class_names == tuple(COCO_CATEGORIES[i][1] for i in order)
    np.testing.assert_array_equal(cocoset.labels, voc.labels[:, order])
    from tools.images import load_rgb_image

    first = [np.asarray(load_rgb_image(s.image_paths[0]), np.int16) for s in (voc, listed, cocoset)]
    assert all(np.abs(img - first[0]).mean() < 3 for img in first)  # the same picture (JPEG re-encoding aside)


def test_voc2007_layout_defaults_and_difficult(tiny_voc, tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    shutil.copytree(tiny_voc, root)
    main = root / "ImageSets" / "Main"
    (main / "train.txt").rename(main / "trainval.txt")
    (main / "val.txt").rename(main / "test.txt")
    assert detect_dataset(tmp_path) == ("voc2007", root.resolve())
    assert default_splits("voc2007") == ("trainval", "test")
    test = open_dataset("voc2007", root, "test")  # the devkit's test list, not the repo's VOC2012 data/test.txt
    ids = (main / "test.txt").read_text().split()
    assert test.names == ids and test.source == main / "test.txt"
    for row, image_id in enumerate(ids):
        annotation = parse_annotation(root / "Annotations" / f"{image_id}.xml")
        np.testing.assert_array_equal(test.labels[row], annotation.labels)
        difficult_only = {o.name for o in annotation.objects if o.difficult} - \
            {o.name for o in annotation.objects if not o.difficult}
        assert {VOC_CLASSES[c] for c in np.flatnonzero(test.ignore[row])} == difficult_only
        assert len(test.boxes[row]) == len(annotation.objects)
    raises(lambda: resolve_dataset(tmp_path, "voc2012"), "VOC2012")  # only VOC2007 here


def test_detection(tiny_voc, tiny_coco, tiny_list, tmp_path):
    assert detect_dataset(tiny_coco)[0] == "coco2014" and detect_dataset(tiny_list)[0] == "list"
    assert detect_dataset(tiny_voc)[0] == "voc2012"
    bare = tmp_path / "mine"  # a VOC folder under another name: VOC2007's six-digit ids decide
    (bare / "ImageSets" / "Main").mkdir(parents=True)
    (bare / "JPEGImages").mkdir()
    (bare / "Annotations").mkdir()
    (bare / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    assert detect_dataset(bare)[0] == "voc2007"
    raises(lambda: detect_dataset(tmp_path / "nowhere"), "does not exist")
    raises(lambda: detect_dataset(bare / "JPEGImages"), "JPEGImages/ folder itself")


def test_list_format_details(tiny_list, tmp_path):
    root = copy(tiny_list, tmp_path)
    lines = (root / "val.csv").read_text().splitlines()
    first_image = lines[0].split(",")[0]
    (root / "mine.csv").write_text('\r\n'.join(["IMAGE, Labels", "", f'"{first_image}", dog ; cat;', lines[1],
                                                lines[1]]) + "\r\n")
    with pytest.warns(UserWarning, match="repeated"):
        got = open_dataset("list", root, "mine")  # header any case, quotes, spaces, CRLF, a trailing ';'
    assert got.names == [first_image, lines[1].split(",")[0]]
    assert [VOC_CLASSES[c] for c in np.flatnonzero(got.labels[0])] == ["cat", "dog"]
    assert open_dataset("list", root, str(root / "mine.csv")).names == got.names  # a path works too
    (root / "empty_labels.csv").write_text(f"{first_image},\n")
    with pytest.warns(UserWarning, match="no labels"):
        assert not open_dataset("list", root, "empty_labels").labels.any()


def test_eval_fit_shows_the_whole_image():
    """COCO at 448 px: a 640 x 480 image is resized to 448 x 336 and padded, not cut to its top-left corner."""
    from PIL import Image

    from tools.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    fitted = EvalTransform(448, fit_long_side=True)(image).numpy()
    small = np.asarray(image.resize((448, 336), Image.BICUBIC), np.float64) / 255.0
    want = (small - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(fitted[:, :336, :].transpose(1, 2, 0), want, atol=1e-5)
    assert not fitted[:, 336:, :].any()  # the padding
    cut = EvalTransform(448)(image).numpy()  # the reference protocol: the native top-left window
    np.testing.assert_allclose(cut[:, :448, :448].transpose(1, 2, 0)[0, 0],
                               (np.asarray(image, np.float64)[0, 0] / 255 - IMAGENET_MEAN) / IMAGENET_STD, atol=1e-5)


# ----------------------------------------------------------------------------- the COCO label cache
def test_coco_cache_is_used_and_follows_the_file(tiny_coco, tmp_path, monkeypatch):
    root = copy(tiny_coco, tmp_path)
    json_path = root / "annotations" / "instances_val2014.json"
    first = coco.load_instances(json_path)
    caches = list((tmp_path / "cache" / "coco_labels").glob("instances_val2014-*.npz"))
    assert len(caches) == 1
    parsed = []
    real_parse = coco.parse_instances
    monkeypatch.setattr(coco, "parse_instances", lambda p: parsed.append(p) or real_parse(p))
    again = coco.load_instances(json_path)
    assert parsed == []  # served from the cache
    assert again.class_names == first.class_names and again.file_names == first.file_names
    np.testing.assert_array_equal(again.labels, first.labels)
    data = json.loads(json_path.read_text())
    data["annotations"] = data["annotations"][1:]  # the file changes: parsed again, the old cache replaced
    json_path.write_text(json.dumps(data))
    os.utime(json_path, ns=(1, 1))
    changed = coco.load_instances(json_path)
    assert parsed == [json_path] and changed.labels.sum() == first.labels.sum() - 1
    caches = list((tmp_path / "cache" / "coco_labels").glob("instances_val2014-*.npz"))
    assert len(caches) == 1
    caches[0].write_bytes(b"damaged")  # a damaged cache is rebuilt, not trusted
    np.testing.assert_array_equal(coco.load_instances(json_path).labels, changed.labels)
    assert len(parsed) == 2


# ----------------------------------------------------------------------------- bad input
def test_coco_bad_input(tiny_coco, tmp_path):
    root = copy(tiny_coco, tmp_path)
    ann = root / "annotations"
    good = (ann / "instances_val2014.json").read_text()
    (ann / "instances_val2014.json").unlink()
    raises(lambda: open_dataset("coco2014", root, "val2014"), "instances_val2014.json does not exist",
           "annotations_trainval2014.zip")
    (ann / "instances_val2014.json").write_text(json.dumps({"images": [], "annotations": []}))  # captions-like
    raises(lambda: open_dataset("coco2014", root, "val2014"), "not a COCO instances file", "categories")
    (ann / "instances_val2014.json").write_text(good[:-20])
    raises(lambda: open_dataset("coco2014", root, "val2014"), "not valid JSON")
    data = json.loads(good)
    data["annotations"][3]["category_id"] = 999
    (ann / "instances_val2014.json").write_text(json.dumps(data))
    raises(lambda: open_dataset("coco2014", root, "val2014"), "instances_val2014.json", "category_id 999",
           f"annotation {data['annotations'][3]['id']}")
    (ann / "instances_val2014.json").write_text(good)
    missing = json.loads(good)["images"][0]["file_name"]
    (root / "val2014" / missing).unlink()
    raises(lambda: open_dataset("coco2014", root, "val2014", keep_unlabelled=True), "1 of", missing, "val2014.zip")
    empty = json.loads(good)
    empty["annotations"] = []
    (ann / "instances_val2014.json").write_text(json.dumps(empty))
    raises(lambda: open_dataset("coco2014", root, "val2014"), "has no images")


def test_list_bad_input(tiny_list, tmp_path):
    root = copy(tiny_list, tmp_path)
    lines = (root / "train.csv").read_text().splitlines()  # line 1 is the header
    image = lines[1].split(",")[0]
    for body, words in [
        ([lines[0], lines[1], f"{image},dog;plane"], ["train.csv line 3", "unknown class 'plane'", "classes.txt"]),
        ([lines[0], "images/nowhere.jpg,dog", lines[2]], ["1 of 2 images do not exist", "line 2 images/nowhere.jpg"]),
        ([lines[0], lines[1], f"{image},dog,cat"], ["train.csv line 3", "malformed", "3 fields"]),
        ([lines[0], lines[1], image], ["train.csv line 3", "malformed", "1 field"]),
        ([lines[0]], ["has no images", "train.csv"]),
    ]:
        (root / "train.csv").write_text("\n".join(body) + "\n")
        raises(lambda: open_dataset("list", root, "train"), *words)
    raises(lambda: open_dataset("list", root, "nosuch"), "unknown split 'nosuch'", "val")
    (root / "classes.txt").write_text("dog\ncat\ndog\n")
    raises(lambda: open_dataset("list", root, "val"), "'dog' is listed more than once")
    (root / "classes.txt").unlink()
    raises(lambda: resolve_dataset(root, "list"), "classes.txt")


def test_dataset_flag_must_match_the_layout(tiny_voc, tiny_coco, tiny_list, tmp_path):
    raises(lambda: resolve_dataset(tiny_voc, "coco2014"), "--dataset coco2014 does not match", "VOC folder",
           "--dataset voc2012")
    raises(lambda: resolve_dataset(tiny_coco, "list"), "--dataset list does not match", "COCO folder")
    raises(lambda: resolve_dataset(tiny_list, "voc2007"), "does not match", "list folder")
    raises(lambda: resolve_dataset(tmp_path, "coco2014"), "not a coco2014 folder", "annotations/")
    assert resolve_dataset(tiny_voc, "voc2007")[0] == "voc2007"  # the same layout: the flag decides


# ----------------------------------------------------------------------------- check_dataset
def run_check(argv, capsys) -> tuple[int, list[str], list[str]]:
    code, out, err = call(check_main, argv, capsys)
    return code, out.strip().splitlines(), [line for line in err.splitlines() if line.startswith("error:")]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


def test_check_dataset_lists_every_broken_file_of_a_list_folder(tiny_list, tmp_path, capsys):
    code, out, errors = run_check(["--data_dir", tiny_list], capsys)
    assert code == 0 and out[-1].startswith("ok: 26 images") and not errors
    root = copy(tiny_list, tmp_path)
    lines = (root / "train.csv").read_text().splitlines()
    paths = [line.split(",")[0] for line in lines[1:]]
    truncate(root / paths[0])
    (root / paths[1]).unlink()
    (root / paths[2]).write_bytes(b"not an image at all")
    lines[4] = f"{paths[3]},dog;plane"
    lines[5] = f"{paths[4]},dog,cat"
    lines[6] = f"{paths[5]},"
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    code, out, errors = run_check(["--data_dir", root, "--workers", 2], capsys)
    assert code == 2 and len(errors) == 1 and "6 problem(s)" in errors[0]
    assert len(out) == 6
    report = "\n".join(out)
    for words in [(paths[0].split("/")[-1], "truncated"), (paths[1], "line 3", "does not exist"),
                  (paths[2].split("/")[-1], "not an image"), ("line 5", "'plane'"), ("line 6", "malformed"),
                  (paths[5], "no labels")]:
        assert any(all(w in line for w in words) for line in out), (words, report)


def test_check_dataset_on_voc_and_coco(tiny_voc, tiny_coco, tmp_path, capsys):
    voc = copy(tiny_voc, tmp_path, "voc")
    ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    truncate(voc / "JPEGImages" / f"{ids[0]}.jpg")
    (voc / "JPEGImages" / f"{ids[1]}.jpg").unlink()
    xml = voc / "Annotations" / f"{ids[2]}.xml"
    xml.write_text(xml.read_text().replace("<name>", "<name>x", 1))
    code, out, errors = run_check(["--data_dir", voc, "--split", "main:train", "main:val"], capsys)
    assert code == 2 and len(errors) == 1 and len(out) == 3
    assert any(f"{ids[0]}.jpg" in line and "truncated" in line for line in out)
    assert any(f"{ids[1]}.jpg" in line and "missing" in line for line in out)
    assert any(f"{ids[2]}.xml" in line and "unknown class" in line for line in out)
    root = copy(tiny_coco, tmp_path, "coco")
    names = sorted(p.name for p in (root / "train2014").iterdir())
    truncate(root / "train2014" / names[0])
    (root / "val2014" / sorted(p.name for p in (root / "val2014").iterdir())[0]).unlink()
    code, out, errors = run_check(["--data_dir", root], capsys)
    assert code == 2 and len(out) == 2 and "2 problem(s)" in errors[0]
    assert any(names[0] in line and "truncated" in line for line in out)
    assert any("val2014/" in line and "missing" in line for line in out)
    code, out, errors = run_check(["--data_dir", root, "--split", "nosuch"], capsys)
    assert code == 2 and "nosuch" in out[0] and "train2014" in out[0]  # lists the available splits


def test_outdated_demo_sets_are_recognised(tiny_coco, tiny_voc, tmp_path):
    """A COCO or list demo set follows the VOC generator's version too: new masks or drawings rebuild it."""
    from tools.demo_formats import is_outdated_demo

    assert not is_outdated_demo(tiny_coco, "coco") and not is_outdated_demo(tiny_voc, "voc")
    root = copy(tiny_coco, tmp_path)
    marker = json.loads((root / ".oass_demo.json").read_text())
    (root / ".oass_demo.json").write_text(json.dumps({**marker, "voc_format_version": 0}))
    assert is_outdated_demo(root, "coco")
    (root / ".oass_demo.json").unlink()
    assert not is_outdated_demo(root, "coco")  # not a generated set: used as it is
