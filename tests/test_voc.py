"""VOC folders, split lists, XML labels, image decoding and the classification Dataset."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.augment import EvalTransform, TrainTransform
from tools.errors import UserError
from tools.voc import (
    NUM_CLASSES,
    REPO_DATA_DIR,
    VOC_CLASSES,
    BadImageError,
    VOCClassification,
    difficult_matrix,
    labels_matrix,
    load_rgb_image,
    load_split,
    parse_annotation,
    read_split_file,
    resolve_split,
    resolve_voc_root,
)


def write_xml(path: Path, objects: list[tuple[str, tuple[int, int, int, int], int]],
              size: tuple[int, int] = (100, 80)) -> Path:
    """A VOC annotation with (name, (xmin, ymin, xmax, ymax), difficult) objects."""
    parts = [f"<annotation><filename>{path.stem}.jpg</filename>",
             f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin>"
                     f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    parts.append("</annotation>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def write_jpeg(path: Path, colour: tuple[int, int, int] = (120, 60, 30),
               size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)


def make_voc(root: Path, ids: list[str], with_xml: bool = True) -> Path:
    """A VOC2012 folder where image i holds one object of class i % 20."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, image_id in enumerate(ids):
        write_jpeg(root / "JPEGImages" / f"{image_id}.jpg", colour=(10 * k % 256, 100, 200))
        if with_xml:
            write_xml(root / "Annotations" / f"{image_id}.xml", [(VOC_CLASSES[k % 20], (2, 3, 20, 25), 0)])
    return root


# ----------------------------------------------------------------------------------------------
# XML


def test_class_list_matches_repo_file():
    names = (REPO_DATA_DIR / "class_names.txt").read_text().split()
    assert tuple(names) == VOC_CLASSES and len(VOC_CLASSES) == NUM_CLASSES == 20


def test_difficult_objects_are_positives_and_difficult_only_is_flagged(tmp_path):
    xml = write_xml(tmp_path / "Annotations" / "a.xml", [
        ("dog", (10, 10, 50, 50), 1),       # dog: only difficult objects
        ("cat", (5, 5, 30, 30), 1),
        ("cat", (40, 20, 90, 70), 0),       # cat: one easy object
        ("person", (10, 10, 10, 40), 0),    # zero width: dropped
        ("horse", (10, 40, 30, 40), 0),     # zero height: dropped
        ("sheep", (30, 40, 20, 50), 0),     # xmax < xmin: dropped
    ])
    ann = parse_annotation(xml)
    idx = {n: VOC_CLASSES.index(n) for n in ("dog", "cat", "person", "horse", "sheep")}
    assert ann.labels.dtype == np.float32 and ann.labels.shape == (20,)
    assert ann.labels[idx["dog"]] == 1 and ann.labels[idx["cat"]] == 1
    assert ann.labels.sum() == 2
    assert ann.difficult_only.dtype == bool
    assert ann.difficult_only[idx["dog"]] and not ann.difficult_only[idx["cat"]]
    assert ann.difficult_only.sum() == 1
    assert [o.name for o in ann.objects] == ["dog", "cat", "cat"]
    assert ann.objects[0].box == (10, 10, 50, 50) and ann.objects[0].difficult


def test_no_objects_gives_zero_labels(tmp_path):
    ann = parse_annotation(write_xml(tmp_path / "e.xml", []))
    assert not ann.labels.any() and not ann.difficult_only.any() and ann.objects == ()


def test_class_names_are_stripped_but_otherwise_exact(tmp_path):
    xml = write_xml(tmp_path / "Annotations" / "ok.xml", [("  tvmonitor\n ", (1, 1, 9, 9), 0)])
    ann = parse_annotation(xml)
    assert ann.labels[VOC_CLASSES.index("tvmonitor")] == 1
    with pytest.raises(UserError, match="'Dog'"):
        parse_annotation(write_xml(tmp_path / "Annotations" / "caps.xml", [("Dog", (1, 1, 9, 9), 0)]))


def test_unknown_class_names_file_name_and_choices(tmp_path):
    xml = write_xml(tmp_path / "Annotations" / "x.xml", [("plane", (1, 1, 9, 9), 0)])
    with pytest.raises(UserError) as info:
        parse_annotation(xml)
    message = str(info.value)
    assert "Annotations/x.xml" in message and "'plane'" in message
    assert "20 VOC classes" in message and "aeroplane" in message and "tvmonitor" in message


def test_malformed_xml_names_the_file(tmp_path):
    bad = tmp_path / "Annotations" / "broken.xml"
    bad.parent.mkdir()
    bad.write_text("<annotation><object><name>dog</name></annotation>")
    with pytest.raises(UserError, match=r"Annotations/broken\.xml: malformed XML"):
        parse_annotation(bad)
    write_xml(bad, [("dog", (1, 1, 9, 9), 0)])
    bad.write_text(bad.read_text().replace("<xmin>1</xmin>", "<xmin>left</xmin>"))
    with pytest.raises(UserError, match=r"broken\.xml.*xmin"):
        parse_annotation(bad)


def test_float_coordinates_are_truncated_and_boxes_clamped(tmp_path):
    xml = write_xml(tmp_path / "f.xml", [("bus", (0, 0, 0, 0), 0)], size=(50, 40))
    xml.write_text(xml.read_text().replace("<xmax>0</xmax>", "<xmax>273.5</xmax>")
                   .replace("<ymax>0</ymax>", "<ymax>12.9</ymax>"))
    (obj,) = parse_annotation(xml).objects
    assert obj.box == (0, 0, 49, 12)


# ----------------------------------------------------------------------------------------------
# Dataset root


@pytest.fixture()
def devkit(tmp_path):
    return make_voc(tmp_path / "data" / "VOCdevkit" / "VOC2012", ["a1", "a2"])


@pytest.mark.parametrize("given", ["data/VOCdevkit/VOC2012", "data", "data/VOCdevkit"])
def test_resolve_voc_root_accepts_three_layouts(tmp_path, devkit, given):
    assert resolve_voc_root(tmp_path / given) == devkit.resolve()
    assert resolve_voc_root(str(tmp_path / given)) == devkit.resolve()


def test_resolve_voc_root_explains_wrong_paths(tmp_path, devkit):
    with pytest.raises(UserError, match="does not exist"):
        resolve_voc_root(tmp_path / "nowhere")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_voc_root(a_file)
    with pytest.raises(UserError, match=r"JPEGImages/ folder itself; pass its parent"):
        resolve_voc_root(devkit / "JPEGImages")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no JPEGImages/ folder \(it is empty\).*VOCdevkit/VOC2012"):
        resolve_voc_root(tmp_path / "empty")
    half = tmp_path / "half"
    (half / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError, match="no Annotations/ folder"):
        resolve_voc_root(half)
    (tmp_path / "kit" / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no VOCdevkit/VOC2012/.*VOC2007/"):
        resolve_voc_root(tmp_path / "kit")


# ----------------------------------------------------------------------------------------------
# Split lists


SPLIT_SIZES = [("train_aug", 10582), ("train", 1464), ("val", 1449), ("test", 1456)]


@pytest.mark.parametrize("name, count", SPLIT_SIZES)
def test_repo_split_lists(name, count):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no duplicates expected
        ids = read_split_file(REPO_DATA_DIR / f"{name}.txt")
    assert len(ids) == len(set(ids)) == count
    assert all(len(i) == 11 and i[4] == "_" and i.strip() == i for i in ids)


def test_train_aug_has_crlf_line_ends_that_are_handled():
    assert b"\r\n" in (REPO_DATA_DIR / "train_aug.txt").read_bytes()[:100]
    assert read_split_file(REPO_DATA_DIR / "train_aug.txt")[:2] == ["2007_000032", "2007_000039"]


def test_read_split_file_cleans_lines(tmp_path):
    path = tmp_path / "messy.txt"
    path.write_bytes(b"\xef\xbb\xbfb1\r\n\r\n  a2  \r\nb1\n2008_000002 -1\n2008_000003  1\n\n  \na2\r\n")
    with pytest.warns(UserWarning, match="dropped 2 repeated ids"):
        ids = read_split_file(path)
    assert ids == ["b1", "a2", "2008_000002", "2008_000003"]


def test_read_split_file_missing(tmp_path):
    with pytest.raises(UserError, match="cannot read split list"):
        read_split_file(tmp_path / "none.txt")


@pytest.fixture()
def lists(devkit):
    main = devkit / "ImageSets" / "Main"
    (main / "train.txt").write_text("a1\n")
    (main / "trainval.txt").write_text("a1\na2\n")
    (main / "aeroplane_train.txt").write_text("a1  1\na2 -1\n")
    return devkit


def test_plain_name_prefers_repo_list(lists):
    ids, path = resolve_split(lists, "train")
    assert path == REPO_DATA_DIR / "train.txt" and len(ids) == 1464


def test_main_prefix_reads_devkit_list(lists):
    ids, path = resolve_split(lists, "main:train")
    assert ids == ["a1"] and path == lists / "ImageSets" / "Main" / "train.txt"
    assert resolve_split(lists, "main:aeroplane_train")[0] == ["a1", "a2"]


def test_plain_name_falls_back_to_devkit(lists):
    ids, path = resolve_split(lists, "trainval")
    assert ids == ["a1", "a2"] and path.parent == lists / "ImageSets" / "Main"


def test_path_to_txt_is_used_as_is(lists, tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("a2\n")
    assert resolve_split(lists, str(custom)) == (["a2"], custom)
    with pytest.raises(UserError, match="is not a file"):
        resolve_split(lists, str(tmp_path / "missing.txt"))


def test_unknown_split_lists_choices(lists):
    with pytest.raises(UserError) as info:
        resolve_split(lists, "trian")
    message = str(info.value)
    assert "'trian'" in message
    for name in ("train_aug", "val", "test", "main:train", "main:trainval"):
        assert name in message
    assert "aeroplane_train" not in message and "class_names" not in message
    with pytest.raises(UserError, match="main:nope"):
        resolve_split(lists, "main:nope")
    with pytest.raises(UserError, match="unknown split 'class_names'"):
        resolve_split(lists, "class_names")


def test_empty_split_is_refused(lists):
    (lists / "ImageSets" / "Main" / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="lists no image ids"):
        resolve_split(lists, "main:empty")


# ----------------------------------------------------------------------------------------------
# Loading a split


@pytest.fixture()
def voc(tmp_path):
    ids = [f"img{k:02d}" for k in range(8)]
    root = make_voc(tmp_path / "VOC2012", ids)
    (root / "ImageSets" / "Main" / "all.txt").write_text("\n".join(ids) + "\n")
    return root


def test_load_split_parses_labels(voc):
    split = load_split(voc, "main:all")
    assert split.name == "main:all" and len(split.ids) == 8 and split.source.name == "all.txt"
    labels = labels_matrix(split)
    assert labels.shape == (8, 20) and labels.dtype == np.float32
    np.testing.assert_array_equal(labels.argmax(1), np.arange(8))
    assert difficult_matrix(split).shape == (8, 20) and not difficult_matrix(split).any()


def test_missing_images_are_counted_with_first_ids(voc):
    ids = [f"img{k:02d}" for k in range(8)]
    (voc / "ImageSets" / "Main" / "more.txt").write_text("\n".join(ids + [f"gone{k}" for k in range(7)]))
    for k in range(7):
        write_xml(voc / "Annotations" / f"gone{k}.xml", [("cat", (1, 1, 5, 5), 0)])
    with pytest.raises(UserError) as info:
        load_split(voc, "main:more")
    message = str(info.value)
    assert "7 of 15 ids in split 'main:more'" in message and "no image in JPEGImages/" in message
    assert "gone0, gone1, gone2, gone3, gone4, ..." in message and "gone5" not in message


def test_missing_annotations_are_counted(voc):
    (voc / "Annotations" / "img03.xml").unlink()
    (voc / "Annotations" / "img05.xml").unlink()
    expected = r"2 of 8 ids in split 'main:all' .* no annotation in Annotations/: img03, img05$"
    with pytest.raises(UserError, match=expected):
        load_split(voc, "main:all")


def test_split_without_any_annotation_is_refused(tmp_path):
    root = make_voc(tmp_path / "VOC2012", ["t1", "t2", "t3"], with_xml=False)
    (root / "ImageSets" / "Main" / "test.txt").write_text("t1\nt2\nt3\n")
    with pytest.raises(UserError, match="has no annotations.*not public.*such as val"):
        load_split(root, "main:test")
    split = load_split(root, "main:test", require_annotations=False)
    assert split.annotations is None and split.ids == ["t1", "t2", "t3"]
    with pytest.raises(UserError, match="no annotations"):
        labels_matrix(split)
    item = VOCClassification(root, split, EvalTransform(16))[1]
    assert item[1].shape == (20,) and not item[1].any() and item[2] == 1


def test_repo_list_shadowing_devkit_list_gives_a_hint(voc):
    (voc / "ImageSets" / "Main" / "val.txt").write_text("img00\n")
    with pytest.raises(UserError, match=r"none of the 1449 ids of split 'val' .*val\.txt: pass main:val"):
        load_split(voc, "val")
    write_jpeg(voc / "JPEGImages" / "2007_000033.jpg")
    write_xml(voc / "Annotations" / "2007_000033.xml", [("cat", (1, 1, 5, 5), 0)])
    with pytest.raises(UserError, match=r"1448 of 1449 ids in split 'val'.*pass main:val to use it"):
        load_split(voc, "val")


def test_images_without_objects_are_kept_with_a_warning(voc):
    write_xml(voc / "Annotations" / "img02.xml", [])
    with pytest.warns(UserWarning, match="1 images of split 'main:all' have no object"):
        split = load_split(voc, "main:all")
    assert not labels_matrix(split)[2].any()


# ----------------------------------------------------------------------------------------------
# Image decoding


def test_plain_rgb_jpeg(tmp_path):
    path = tmp_path / "JPEGImages" / "rgb.jpg"
    write_jpeg(path, (200, 40, 90))
    img = load_rgb_image(path)
    assert img.mode == "RGB" and img.size == (40, 30)
    assert np.abs(np.asarray(img, int) - [200, 40, 90]).max() <= 3


def test_grayscale_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.new("L", (16, 12), 100).save(path)
    img = load_rgb_image(path)
    assert img.mode == "RGB" and np.abs(np.asarray(img, int) - 100).max() <= 2


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)  # pure red in CMYK
    img = load_rgb_image(path)
    assert img.mode == "RGB" and np.abs(np.asarray(img, int) - [255, 0, 0]).max() <= 4


def test_png_behind_jpg_name(tmp_path):
    path = tmp_path / "actually_png.jpg"
    Image.new("RGBA", (8, 8), (10, 200, 30, 255)).save(path, format="PNG")
    img = load_rgb_image(path)
    assert img.mode == "RGB" and (np.asarray(img) == [10, 200, 30]).all()


def test_palette_with_transparency_and_16_bit(tmp_path):
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 7, 8, 9] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.jpg", format="PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (np.asarray(load_rgb_image(tmp_path / "pal.jpg")) == [7, 8, 9]).all()
    deep = Image.fromarray(np.full((4, 4), 257 * 100, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    assert (np.asarray(load_rgb_image(tmp_path / "deep.png")) == 100).all()


def write_noise_jpeg(path: Path, size: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path.read_bytes()


def test_truncated_or_garbage_file_raises_bad_image(tmp_path):
    path = tmp_path / "JPEGImages" / "x.jpg"
    data = write_noise_jpeg(path)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=r"JPEGImages/x\.jpg is truncated or not an image.*skip_bad"):
        load_rgb_image(path)
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=r"JPEGImages/x\.jpg"):
        load_rgb_image(path)
    with pytest.raises(BadImageError, match="does not exist"):
        load_rgb_image(tmp_path / "JPEGImages" / "nope.jpg")
    assert issubclass(BadImageError, UserError)


# ----------------------------------------------------------------------------------------------
# Dataset


class RecordingTransform:
    def __init__(self):
        self.rngs = []

    def __call__(self, img, rng):
        self.rngs.append(rng)
        return torch.zeros(3, 4, 4)


def test_dataset_items(voc):
    split = load_split(voc, "main:all")
    ds = VOCClassification(voc, split, EvalTransform(32))
    assert len(ds) == 8
    image, label, index = ds[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.float32 and label.shape == (20,) and label.argmax() == 3 and index == 3
    assert (image[:, 30:, :] == 0).all() and (image[:, :30, :] != 0).any()  # 40x30 image, top-left
    with pytest.raises(IndexError):
        ds[8]


def test_dataset_seeds_drive_the_transform(voc):
    split = load_split(voc, "main:all")
    recorder = RecordingTransform()
    ds = VOCClassification(voc, split, recorder)
    ds[0]
    ds[(1, 7)]
    assert recorder.rngs[0] is None and isinstance(recorder.rngs[1], np.random.Generator)
    train = VOCClassification(voc, split, TrainTransform(24, 16, 48))
    a, b = train[(5, 123)][0], train[(5, 123)][0]
    assert torch.equal(a, b)
    assert any(not torch.equal(a, train[(5, seed)][0]) for seed in range(5))


def test_bad_image_raises_or_is_skipped(voc):
    split = load_split(voc, "main:all")
    for k in (2, 3, 7):
        (voc / "JPEGImages" / f"img{k:02d}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    strict = VOCClassification(voc, split, EvalTransform(16))
    with pytest.raises(BadImageError, match="img02.jpg"):
        strict[2]
    lenient = VOCClassification(voc, split, EvalTransform(16), skip_bad_images=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _, label, index = lenient[2]
    assert index == 4 and label.argmax() == 4
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and "img02.jpg" in messages[0] and "img03.jpg" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known bad images are not decoded (nor warned about) again
        assert lenient[(3, 5)][2] == 4
    with pytest.warns(UserWarning, match="img07.jpg"):
        assert lenient[7][2] == 0  # wraps around
