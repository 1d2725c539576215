"""CAM quality: make_cams.py's multi-scale fusion, evaluate_cams.py end to end, the localisation metrics logged
at validation, and the bad input of both tools.

A random-init resnet18 checkpoint is written directly (no training): the tools only need its weights and config.
"""
import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tool_calls import call

import evaluate_cams
import make_cams
from core.builder import Classifier
from core.builder import make_cams as normalised_cams
from core.evaluation import evaluate
from core.localisation import keypoint_strategies, score_localisation
from core.runtime import Runtime
from core.strategies import STRATEGIES, Strategy, build_tasks, register_strategy
from tools.augment import EvalTransform, normalize
from tools.cam_metrics import HitTally
from tools.voc import CLASS_INDEX, VOC_CLASSES, VOCClassification, labels_matrix, load_rgb_image, load_split

SPLIT = "main:val"



def error_line(code: int, err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_checkpoint(path: Path, voc: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = Classifier("resnet18", mode="normal", pretrained="none")
    config = {"architecture": "resnet18", "mode": "normal", "image_size": 64, "data_dir": str(voc), "demo": False,
              "val_split": SPLIT, "k": 3, "min_distance": 4, "num_workers": 0, "amp": "off", "tag": "rand"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config, "epoch": 0.0, "iteration": 0}, path)
    return path


@pytest.fixture(scope="module")
def made(tiny_voc, tmp_path_factory) -> SimpleNamespace:
    """A random-init run ('rand') with its best checkpoint and the CAMs of main:val made by make_cams.py."""
    exp = tmp_path_factory.mktemp("cams") / "exp"
    ckpt = write_checkpoint(exp / "models" / "rand_best.pth", tiny_voc, seed=0)
    make_cams.main(["--tag", "rand", "--output_dir", str(exp)])
    folder = exp / "cams" / "rand_main_val"
    return SimpleNamespace(voc=tiny_voc, exp=exp, ckpt=ckpt, folder=folder, split=load_split(tiny_voc, SPLIT))


# ----------------------------------------------------------------------------- the protocol
@torch.no_grad()
def direct_cams(model: Classifier, image: Image.Image, scales: tuple[float, ...]) -> np.ndarray:
    """Puzzle-CAM's per-image loop written out: one forward per view, each upsampled on its own."""
    width, height = image.size
    padded = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    total = 0
    for scale in scales:
        resized = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
        x = torch.from_numpy(normalize(np.asarray(resized)))[None]
        plain = F.relu(model(x)[1])
        mirrored = F.relu(model(x.flip(-1))[1]).flip(-1)
        for maps in (plain, mirrored):
            upsampled = F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)
            total = total + upsampled[0, :, :height, :width]
    peak = total.flatten(1).max(dim=1).values[:, None, None]
    return (total / (peak + 1e-5)).numpy()


def test_fusion_equals_the_per_image_protocol(tiny_voc):
    torch.manual_seed(1)
    model = Classifier("resnet18", mode="normal", pretrained="none").eval()
    split = load_split(tiny_voc, SPLIT)
    image = load_rgb_image(tiny_voc / "JPEGImages" / f"{split.ids[0]}.jpg")
    scales = (1.0, 0.5, 1.5, 2.0)
    dataset = make_cams.ScaledImages(tiny_voc, [split.ids[0]] * 2, scales)  # a batch of two equal-size images
    views = [torch.stack(pair) for pair in zip(dataset[0][0], dataset[1][0])]
    assert [tuple(v.shape[-2:]) for v in views] == [(round(image.height * s), round(image.width * s)) for s in scales]
    fused = make_cams.fuse_cams(model, views, (image.height, image.width), {"device_type": "cpu", "enabled": False})
    expected = direct_cams(model, image, scales)
    assert fused.shape == (2, 20, image.height, image.width)
    for row in fused.numpy():
        np.testing.assert_allclose(row, expected, atol=2e-5)


def test_same_size_batches_group_equal_sizes_in_split_order():
    sizes = [(5, 4), (6, 4), (5, 4), (5, 4), (6, 4)]
    assert make_cams.same_size_batches([0, 1, 2, 3, 4], sizes, 2) == [[0, 2], [3], [1, 4]]
    assert make_cams.same_size_batches([1, 3], sizes, 8) == [[1], [3]]


# ----------------------------------------------------------------------------- make_cams.py output
def test_cam_files_hold_the_positive_classes_at_image_size(made):
    labels = labels_matrix(made.split)
    meta = json.loads((made.folder / "cams.json").read_text())
    assert meta["checkpoint_sha256"] == hashlib.sha256(made.ckpt.read_bytes()).hexdigest()
    assert meta["split"] == SPLIT and meta["scales"] == [1.0, 0.5, 1.5, 2.0] and meta["network"] == "student"
    for index, image_id in enumerate(made.split.ids):
        with np.load(made.folder / f"{image_id}.npz") as data:
            classes, cams = data["classes"], data["cams"]
        with Image.open(made.voc / "JPEGImages" / f"{image_id}.jpg") as image:
            assert cams.shape == (len(classes), image.height, image.width)
        assert classes.tolist() == np.flatnonzero(labels[index]).tolist()
        assert cams.dtype == np.float32 and cams.min() >= 0 and (cams.max(axis=(1, 2)) < 1).all()


def test_resume_makes_only_the_missing_files(made, capsys):
    files = sorted(made.folder.glob("*.npz"))
    before = {p: p.stat().st_mtime_ns for p in files}
    with np.load(files[3]) as data:
        original = data["cams"]
    files[3].unlink()
    code, _, err = call(make_cams.main, ["--tag", "rand", "--output_dir", made.exp, "--resume"], capsys)
    assert code == 0, err
    with np.load(files[3]) as data:
        np.testing.assert_allclose(data["cams"], original, atol=1e-6)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != files[3])
    # without --resume the folder is not touched
    error_line(*call(make_cams.main, ["--tag", "rand", "--output_dir", made.exp], capsys)[::2], "--resume")


# ----------------------------------------------------------------------------- evaluate_cams.py
def oracle_prediction(cams: np.ndarray, classes: np.ndarray, threshold: float) -> np.ndarray:
    """The reference's rule: argmax over [threshold, CAMs...] mapped to [0, class + 1, ...]."""
    padded = np.concatenate([np.full((1, *cams.shape[1:]), threshold, np.float32), cams])
    return np.concatenate([[0], classes + 1])[padded.argmax(axis=0)]


def oracle_miou(made, threshold: float) -> float:
    inter, union = np.zeros(21), np.zeros(21)
    for image_id in made.split.ids:
        with np.load(made.folder / f"{image_id}.npz") as data:
            prediction = oracle_prediction(data["cams"], data["classes"], threshold)
        truth = np.array(Image.open(made.voc / "SegmentationClass" / f"{image_id}.png"))
        valid = truth != 255
        for c in range(21):
            inter[c] += ((prediction == c) & (truth == c) & valid).sum()
            union[c] += (((prediction == c) | (truth == c)) & valid).sum()
    present = union > 0
    return 100 * float(np.mean(inter[present] / union[present]))


def oracle_pointing_game(made) -> float:
    hits = []
    for image_id, annotation in zip(made.split.ids, made.split.annotations):
        with np.load(made.folder / f"{image_id}.npz") as data:
            for c, cam in zip(data["classes"], data["cams"]):
                y, x = np.unravel_index(np.argmax(cam), cam.shape)
                boxes = [o.box for o in annotation.objects if o.name == VOC_CLASSES[c]]
                hits.append(cam.max() > 0 and any(x0 <= x + 1 <= x1 and y0 <= y + 1 <= y1 for x0, y0, x1, y1 in boxes))
    return 100 * float(np.mean(hits))


def test_evaluate_cams_matches_direct_miou_pointing_game_and_writes_pseudo_labels(made, capsys, tmp_path):
    code, out, err = call(evaluate_cams.main, ["--tag", "rand", "--output_dir", made.exp,
                                               "--save_pseudo_labels", tmp_path / "pseudo"], capsys)
    assert code == 0, err
    result = json.loads((made.exp / "data" / "rand_eval_cams_main_val.json").read_text())
    thresholds = [row["threshold"] for row in result["thresholds"]]
    assert thresholds == pytest.approx([0.05 * i for i in range(1, 13)])
    for row in result["thresholds"]:
        assert row["mIoU"] == pytest.approx(oracle_miou(made, row["threshold"]), abs=1e-9)
    best = max(result["thresholds"], key=lambda r: r["mIoU"])
    assert result["best_threshold"] == best["threshold"] and result["best_mIoU"] == best["mIoU"]
    assert f"best threshold {best['threshold']:.2f}" in out and "tvmonitor" in out and "cTopk-w" in out
    assert result["localisation"]["pointing_game"]["hit_rate"] == pytest.approx(oracle_pointing_game(made))
    pairs = int(labels_matrix(made.split).sum())
    assert [result["localisation"][s]["count"] for s in ("pointing_game", "cmax", "ctopk", "ctopk_w", "max")] == \
        [pairs] * 4 + [len(made.split.ids)]
    for image_id in made.split.ids:
        with Image.open(tmp_path / "pseudo" / f"{image_id}.png") as png:
            assert png.mode == "P" and png.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
            mask = np.array(png)
        with np.load(made.folder / f"{image_id}.npz") as data:
            assert (mask == oracle_prediction(data["cams"], data["classes"], result["best_threshold"])).all()


def test_evaluate_cams_skips_a_failing_plugin_with_one_warning(made, capsys):
    def raising(maps, ctx):
        raise RuntimeError("not today")

    register_strategy(Strategy("broken_eval", "raises", True, True, raising, "teacher", module="tests.broken"))
    try:
        with pytest.warns(UserWarning, match=r"strategy broken_eval \(tests.broken\): its keypoint function raised "
                          r"RuntimeError: not today .*; its hit rate is left out") as caught:
            code, out, err = call(evaluate_cams.main, ["--tag", "rand", "--output_dir", made.exp], capsys)
    finally:
        STRATEGIES.pop("broken_eval")
    assert code == 0 and len([w for w in caught if "broken_eval" in str(w.message)]) == 1, err
    result = json.loads((made.exp / "data" / "rand_eval_cams_main_val.json").read_text())
    assert "broken_eval" not in result["localisation"]
    pairs = int(labels_matrix(made.split).sum())
    assert [result["localisation"][s]["count"] for s in ("pointing_game", "cmax", "ctopk", "ctopk_w")] == [pairs] * 4


def test_keypoint_hits_of_a_hand_made_case():
    """Two blobs per image: class 0's in its box, class 1's 41 px right and 21 px below its box."""
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(60.0), indexing="ij")
    blob = lambda y, x, peak: peak * torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / 18)  # noqa: E731
    cams = torch.stack([blob(10, 15, 0.8), blob(30, 50, 1.0)])[None].repeat(2, 1, 1, 1)
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the second image has no class: Max skips it
    boxes = [np.array([[0, 11, 6, 21, 16], [1, 1, 1, 10, 10]])] * 2
    tally = HitTally()
    score_localisation(tally, cams, labels, boxes, (40, 60), k=3, min_distance=4)
    summary = tally.summary()
    far = math.hypot(50 - 9, 30 - 9)
    assert summary["pointing_game"] == {"hit_rate": 50.0, "count": 2}
    for strategy in ("cmax", "ctopk", "ctopk_w"):
        assert summary[strategy]["hit_rate"] == 50.0 and summary[strategy]["count"] == 2
        assert summary[strategy]["distance"] == pytest.approx(far / 2, abs=1.5)
    # Max: the merged map peaks on class 1's blob; the nearest box of the image's classes is class 0's
    assert summary["max"]["count"] == 1 and summary["max"]["hit_rate"] == 0
    assert summary["max"]["distance"] == pytest.approx(math.hypot(50 - 20, 30 - 15), abs=1.5)


# ----------------------------------------------------------------------------- validation
def test_validation_reports_the_localisation_of_its_own_forward(made):
    """evaluate() with boxes against a per-image recomputation: one forward per image, boxes checked by hand."""
    torch.manual_seed(2)
    model = Classifier("resnet18", mode="normal", pretrained="none").eval()
    dataset = VOCClassification(made.voc, made.split, EvalTransform(64))
    boxes = [np.array([[CLASS_INDEX[o.name], *o.box] for o in a.objects]) for a in made.split.annotations]
    args = SimpleNamespace(eval_batch_size=4, num_workers=0, k=3, min_distance=4, keypoint_rule="reference")
    targets = labels_matrix(made.split)
    result = evaluate(model, dataset, targets, np.zeros_like(targets, bool), args, Runtime(torch.device("cpu")),
                      {"device_type": "cpu", "enabled": False}, boxes=boxes)
    pointing, cmax = [], []
    with torch.no_grad():
        for index in range(len(dataset)):
            image, labels, _ = dataset[index]
            cams = normalised_cams(model(image[None])[1])
            tasks = build_tasks(STRATEGIES["cmax"], cams, labels[None], labels[None], (64, 64), 3, 4)
            for task, c in enumerate(np.flatnonzero(labels.numpy())):
                cam = F.interpolate(cams[:, c:c + 1], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
                y, x = divmod(int(cam.flatten().argmax()), 64)
                inside = [x0 <= x + 1 <= x1 and y0 <= y + 1 <= y1 for k, x0, y0, x1, y1 in boxes[index] if k == c]
                pointing.append(bool(cam.max() > 0) and any(inside))
                ky, kx = tasks.keypoints[task].tolist()
                cmax.append(any(x0 <= kx + 1 <= x1 and y0 <= ky + 1 <= y1 for k, x0, y0, x1, y1 in boxes[index]
                                if k == c))
    assert result["localisation"]["pointing_game"] == pytest.approx(100 * np.mean(pointing))
    assert result["localisation"]["hit_rate_cmax"] == pytest.approx(100 * np.mean(cmax))
    # every registered keypoint strategy is scored: the built-in ones and the plug-ins of strategies/
    assert {"max", "cmax", "ctopk", "ctopk_w"} <= set(keypoint_strategies())
    assert set(result["localisation"]) == {"pointing_game", *(f"{m}_{s}" for m in ("hit_rate", "box_distance")
                                                              for s in keypoint_strategies())}


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("scales", ["1.0,0", "1.0,-0.5", "a,b", "1.0,nan"])
def test_scales_must_be_positive_numbers(made, capsys, scales):
    error_line(*call(make_cams.main, ["--tag", "rand", "--output_dir", made.exp, "--scales", scales,
                                      "--out", made.exp / "never"], capsys)[::2], "--scales")
    assert not (made.exp / "never").exists()


def test_resume_and_overwrite_exclude_each_other(made, capsys):
    error_line(*call(make_cams.main, ["--tag", "rand", "--output_dir", made.exp, "--resume", "--overwrite"],
                     capsys)[::2], "--resume", "--overwrite")


def test_cams_of_another_checkpoint_or_split_are_refused(made, capsys, tmp_path):
    other = str(write_checkpoint(tmp_path / "other.pth", made.voc, seed=5))
    error_line(*call(evaluate_cams.main, ["--tag", "rand", "--checkpoint", other, "--cam_dir", made.folder,
                                          "--output_dir", made.exp], capsys)[::2], "checkpoint", "SHA-256")
    error_line(*call(evaluate_cams.main, ["--tag", "rand", "--split", "main:train", "--cam_dir", made.folder,
                                          "--output_dir", made.exp], capsys)[::2], "split", "main:train")
    error_line(*call(make_cams.main, ["--tag", "rand", "--checkpoint", other, "--out", made.folder, "--resume",
                                      "--output_dir", made.exp], capsys)[::2], "--resume", "checkpoint")
    error_line(*call(evaluate_cams.main, ["--tag", "rand", "--split", "main:train", "--output_dir", made.exp],
                     capsys)[::2], "no CAMs", "rand_main_train", "make_cams.py")


def test_a_split_without_masks_and_a_mask_of_the_wrong_size(made, capsys, tmp_path):
    voc = Path(shutil.copytree(made.voc, tmp_path / "voc"))
    first = made.split.ids[0]
    Image.new("P", (7, 5)).save(voc / "SegmentationClass" / f"{first}.png")
    argv = ["--tag", "rand", "--output_dir", made.exp, "--data_dir", voc, "--cam_dir", made.folder]
    error_line(*call(evaluate_cams.main, argv, capsys)[::2], f"SegmentationClass/{first}.png", "7x5")
    (voc / "SegmentationClass" / f"{made.split.ids[2]}.png").unlink()
    error_line(*call(evaluate_cams.main, argv, capsys)[::2], "no segmentation masks", made.split.ids[2])
    shutil.rmtree(voc / "SegmentationClass")
    error_line(*call(evaluate_cams.main, argv, capsys)[::2], "no segmentation masks", "SegmentationClass")


def test_a_demo_cache_from_an_older_generator_is_rebuilt(tiny_voc, tmp_path, monkeypatch):
    """Tools reading a --demo run's data rebuild a cache without masks (older marker), and keep a current one."""
    import tools.run_inputs as run_inputs

    rebuilt = []
    monkeypatch.setattr(run_inputs, "generate_demo", lambda kind, root: rebuilt.append(root) or root)
    cache = Path(shutil.copytree(tiny_voc, tmp_path / "demo_voc"))
    config = {"demo": "voc", "data_dir": str(cache)}
    assert run_inputs.data_root(config, None) == cache and rebuilt == []
    marker = json.loads((cache / ".oass_demo.json").read_text())
    (cache / ".oass_demo.json").write_text(json.dumps({**marker, "format_version": 1}))
    assert run_inputs.data_root(config, None) == cache and rebuilt == [cache]
