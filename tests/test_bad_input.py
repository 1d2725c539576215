"""VOC folders broken the way users break them: each gives one line naming the problem, exit code 2."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_classification_with_puzzle_cMax_ema.py")
FLAGS = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "normal",
         "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
         "--batch_size", "4", "--num_workers", "1", "--momentum", "0.9", "--lr", "0.01", "--max_iterations", "1"]


@pytest.fixture
def voc(tiny_voc, tmp_path) -> Path:
    """A private copy of the tiny set, to break."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "VOC2012"))


def train(data_dir: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--data_dir", str(data_dir), *FLAGS, *extra,
                           "--output_dir", str(tmp_path / "exp")], capture_output=True, text=True, timeout=300)


def assert_one_line(res: subprocess.CompletedProcess, *words: str) -> str:
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]  # progress bars may precede a mid-run error
    assert line.startswith("error: ")
    for word in words:
        assert word in line, line
    return line


def ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_data_dir_at_the_wrong_level(voc, tmp_path):
    assert_one_line(train(voc / "JPEGImages", tmp_path), "JPEGImages")
    assert_one_line(train(voc / "ImageSets", tmp_path), "ImageSets")


def test_devkit_parent_folder_is_accepted(voc, tmp_path):
    devkit = tmp_path / "data" / "VOCdevkit"
    devkit.mkdir(parents=True)
    shutil.move(str(voc), devkit / "VOC2012")
    res = train(tmp_path / "data", tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("folder", ["JPEGImages", "Annotations"])
def test_missing_folder(voc, tmp_path, folder):
    shutil.rmtree(voc / folder)
    assert_one_line(train(voc, tmp_path), folder)


def test_ids_without_image_or_annotation(voc, tmp_path):
    first = ids(voc, "train")[:3]
    for name in first:
        (voc / "JPEGImages" / f"{name}.jpg").unlink()
    assert_one_line(train(voc, tmp_path), "3 of 16", first[0], "JPEGImages")
    for name in first:  # restore images, now break annotations
        Image.new("RGB", (48, 48)).save(voc / "JPEGImages" / f"{name}.jpg")
    (voc / "Annotations" / f"{first[1]}.xml").unlink()
    assert_one_line(train(voc, tmp_path), "1 of 16", first[1])


def test_corrupt_jpeg_stops_naming_the_file_or_is_skipped(voc, tmp_path):
    bad = voc / "JPEGImages" / f"{ids(voc, 'val')[2]}.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    assert_one_line(train(voc, tmp_path, "--tag", "a"), bad.name, "--skip_bad_images")
    res = train(voc, tmp_path, "--tag", "b", "--skip_bad_images")
    assert res.returncode == 0, res.stderr[-2000:]
    assert bad.name in res.stderr and "warning" in res.stderr


def test_malformed_xml_and_unknown_class_name_the_file(voc, tmp_path):
    name = ids(voc, "train")[4]
    xml = voc / "Annotations" / f"{name}.xml"
    text = xml.read_text()
    xml.write_text(text[: len(text) // 2])
    assert_one_line(train(voc, tmp_path), f"{name}.xml", "malformed")
    first_class = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{first_class}</name>", "<name>plane</name>", 1))
    assert_one_line(train(voc, tmp_path), f"{name}.xml", "plane")


def test_odd_but_valid_input_trains(voc, tmp_path):
    """Grayscale, CMYK, PNG data behind a .jpg name, an image without objects, and a CRLF split list
    with blank lines and duplicates are all read correctly."""
    train_ids = ids(voc, "train")
    images = voc / "JPEGImages"
    Image.open(images / f"{train_ids[0]}.jpg").convert("L").save(images / f"{train_ids[0]}.jpg")
    Image.open(images / f"{train_ids[1]}.jpg").convert("CMYK").save(images / f"{train_ids[1]}.jpg", "JPEG")
    Image.open(images / f"{train_ids[2]}.jpg").save(images / f"{train_ids[2]}.jpg", "PNG")
    xml = voc / "Annotations" / f"{train_ids[3]}.xml"
    text = xml.read_text()
    xml.write_text(text[: text.index("<object>")] + "</annotation>\n")
    crlf = "\r\n".join(train_ids[:8] + ["", train_ids[0], "  "] + train_ids[8:]) + "\r\n"
    (voc / "ImageSets" / "Main" / "train.txt").write_bytes(crlf.encode())
    res = train(voc, tmp_path, "--max_epoch", "1", "--max_iterations", "4")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no object" in res.stderr and "repeated" in res.stderr
    # the CMYK and grayscale files really decode to RGB
    from tools.voc import load_rgb_image

    for name in train_ids[:3]:
        img = load_rgb_image(images / f"{name}.jpg")
        assert img.mode == "RGB" and np.asarray(img).std() > 0


@pytest.mark.parametrize("extra, expected", [
    (["--num_workers", "-1"], "error: --num_workers must not be negative (0: load in the main process; auto: from "
                              "the CPUs), got -1"),
    (["--reference_gpus", "4", "--batch_size", "2"], "error: --reference_gpus 4 must divide --batch_size 2 (each "
     "GPU's share); pass --reference_gpus 1 (or 2), or a --batch_size that is a multiple of 4"),
    (["--reference_gpus", "4", "--batch_size", "6"], "error: --reference_gpus 4 must divide --batch_size 6 (each "
     "GPU's share); pass --reference_gpus 1 (or 2, 3), or a --batch_size that is a multiple of 4"),
    (["--reference_gpus", "3", "--batch_size", "5"], "error: --reference_gpus 3 must divide --batch_size 5 (each "
     "GPU's share); pass --reference_gpus 1, or a --batch_size that is a multiple of 3"),
], ids=["negative_workers", "reference_gpus_2", "reference_gpus_6", "reference_gpus_5"])
def test_bad_flags_say_what_to_do(tiny_voc, tmp_path, capsys, monkeypatch, extra, expected):
    """In-process (the flags are checked before anything is read or written): one line, exit 2, no output."""
    import train_classification_with_puzzle_cMax_ema as script
    from core.trainer import main

    monkeypatch.setattr(sys, "argv", [SCRIPT, "--data_dir", str(tiny_voc), *FLAGS, *extra,
                                      "--output_dir", str(tmp_path / "exp")])
    with pytest.raises(SystemExit) as exit_info:
        main(script.DEFAULTS)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip() == expected and not (tmp_path / "exp").exists()
