"""The research tools (evaluate, visualize, compare, infer, tensorboard) on a tiny trained run.

One 3-iteration run of the cTopk-w script on a tiny generated set is shared by the module; the
tools run in-process through their main(argv) (the same code path as the command line, minus the
interpreter start-up); two real interpreters check the scripts' entry points.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tool_calls import call

import compare_experiments
import evaluate_classification
import infer
import visualize_cams
from core.builder import Classifier, make_cams
from core.keypoints import topk_weighted_cuts, upsample_maps
from core.tb_logging import cam_overlays, close_writer, log_cam_images, log_scalars, make_writer
from tools.augment import EvalTransform, long_side_size
from tools.demo_data import generate_demo_dataset
from tools.metrics import mean_average_precision
from tools.voc import VOC_CLASSES, difficult_matrix, labels_matrix, load_rgb_image, load_split

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode", "normal",
         "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size", "80",
         "--batch_size", "4", "--num_workers", "0", "--momentum", "0.9", "--lr", "0.01", "--min_distance", "8",
         "--max_iterations", "3", "--tag", "tiny"]
SIZE = 64
# One thread everywhere: these tensors are tiny, and on a shared 2-core machine a second OpenMP thread
# mostly spins (5-30x slower). The training run uses one too, so its logged mAP and ours come from the
# same kernels.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> SimpleNamespace:
    base = tmp_path_factory.mktemp("tools")
    voc = generate_demo_dataset(base / "tiny", num_train=16, num_val=10, min_side=48, max_side=64, seed=1)
    exp = base / "experiments"
    out = subprocess.run([sys.executable, str(ROOT / "train_classification_with_puzzle_cTopk_w_ema.py"),
                          "--data_dir", str(voc), *TRAIN, "--output_dir", str(exp)],
                         cwd=base, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    history = json.loads((exp / "data" / "tiny.json").read_text())
    return SimpleNamespace(base=base, voc=voc, exp=exp, history=history)



def load_model(path: Path, key: str = "model") -> Classifier:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = Classifier(ckpt["config"]["architecture"], mode=ckpt["config"]["mode"], pretrained="none",
                       head=ckpt["config"]["head"])
    model.load_state_dict(ckpt[key])
    return model.eval()


@torch.no_grad()
def direct_logits(model: Classifier, voc: Path, scales=(1.0,), flip=False) -> np.ndarray:
    """Logits of main:val computed here: top-left padded inputs, batches of 4 like the run's evaluation."""
    ids = load_split(voc, "main:val").ids
    inputs = torch.stack([EvalTransform(SIZE)(load_rgb_image(voc / "JPEGImages" / f"{i}.jpg")) for i in ids])
    rows = []
    for batch in inputs.split(4):
        views = []
        for scale in scales:
            side = max(16, round(SIZE * scale / 16) * 16)
            scaled = batch if side == SIZE else F.interpolate(batch, size=(side, side), mode="bilinear",
                                                              align_corners=False)
            views += [scaled, scaled.flip(-1)] if flip else [scaled]
        rows.append(torch.stack([model(v)[0] for v in views]).mean(0))
    return torch.cat(rows).numpy()


def expected_aps(logits: np.ndarray, voc: Path) -> tuple[float, np.ndarray, float, np.ndarray]:
    split = load_split(voc, "main:val")
    targets, ignore = labels_matrix(split), difficult_matrix(split)
    m_ref, ap_ref = mean_average_precision(logits, targets, kind="reference")
    m_voc, ap_voc = mean_average_precision(logits, targets, ignore=ignore, kind="voc")
    return m_ref, ap_ref, m_voc, ap_voc


def check_table(result: dict, logits: np.ndarray, voc: Path, **approx) -> None:
    m_ref, ap_ref, m_voc, ap_voc = expected_aps(logits, voc)
    assert result["mAP"] == pytest.approx(m_ref, **approx) and result["mAP_voc"] == pytest.approx(m_voc, **approx)
    for row, ref, voc_ap in zip(result["classes"], ap_ref, ap_voc):
        for got, want in ((row["AP"], ref), (row["AP_voc"], voc_ap)):
            assert (got is None) if np.isnan(want) else got == pytest.approx(100 * want, **approx), row


def one_error_line(code: int, err: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


# ----------------------------------------------------------------------------- evaluate_classification.py
def test_evaluate_equals_direct_maps_and_the_runs_own_validation(run, capsys):
    code, out, err = call(evaluate_classification.main,
                          ["--tag", "tiny", "--checkpoint", "last", "--output_dir", run.exp], capsys)
    assert code == 0, err
    result = json.loads((run.exp / "data" / "tiny_eval_main_val.json").read_text())
    logits = direct_logits(load_model(run.exp / "models" / "tiny_last.pth"), run.voc)
    check_table(result, logits, run.voc, rel=0, abs=0)
    last = run.history["validation"][-1]
    assert result["mAP"] == last["mAP"] and result["mAP_voc"] == last["mAP_voc"]  # same protocol, bit for bit
    rows = list(csv.DictReader(open(run.exp / "data" / "tiny_eval_main_val.csv")))
    assert [r["class"] for r in rows] == [*VOC_CLASSES, "mAP"] and float(rows[-1]["AP"]) == result["mAP"]
    map_line = next(line for line in out.splitlines() if line.startswith("mAP "))
    assert map_line.split()[1:] == [f"{result['mAP']:.2f}", f"{result['mAP_voc']:.2f}"]


def test_evaluate_teacher_multiscale_and_flip(run, capsys):
    code, _, err = call(evaluate_classification.main, ["--tag", "tiny", "--checkpoint", "last", "--teacher",
                                                       "--output_dir", run.exp], capsys)
    assert code == 0, err
    teacher = json.loads((run.exp / "data" / "tiny_eval_main_val_teacher.json").read_text())
    assert teacher["network"] == "teacher" and teacher["mAP"] == run.history["validation"][-1]["mAP_teacher"]

    code, _, err = call(evaluate_classification.main, ["--tag", "tiny", "--checkpoint", "last", "--scales",
                                                       "1.0,0.5", "--flip", "--output_dir", run.exp], capsys)
    assert code == 0, err
    result = json.loads((run.exp / "data" / "tiny_eval_main_val.json").read_text())
    assert result["scales"] == [1.0, 0.5] and result["flip"] is True
    logits = direct_logits(load_model(run.exp / "models" / "tiny_last.pth"), run.voc, (1.0, 0.5), flip=True)
    check_table(result, logits, run.voc, rel=1e-9)


def test_evaluate_a_demo_run_finds_the_demo_set_and_its_split(run, capsys, monkeypatch):
    """A --demo run's config has data_dir None and val_split main:val: the demo cache is used."""
    monkeypatch.setenv("OASS_CACHE", str(run.base / "cache"))
    shutil.copytree(run.voc, run.base / "cache" / "demo_voc")
    ckpt = torch.load(run.exp / "models" / "tiny_last.pth", weights_only=False)
    ckpt["config"].update(demo="voc", data_dir=None, tag="demo_like")
    torch.save(ckpt, run.exp / "models" / "demo_like_last.pth")
    code, _, err = call(evaluate_classification.main, ["--tag", "demo_like", "--checkpoint", "last",
                                                       "--output_dir", run.exp], capsys)
    assert code == 0, err
    result = json.loads((run.exp / "data" / "demo_like_eval_main_val.json").read_text())
    assert result["split"] == "main:val" and result["data_root"] == str(run.base / "cache" / "demo_voc")
    assert result["mAP"] == run.history["validation"][-1]["mAP"]


# ----------------------------------------------------------------------------- visualize_cams.py
def unlabelled_copy(run) -> Path:
    """The tiny set plus a split 'main:test' whose images have no XML."""
    root = run.base / "nolabels"
    if not root.exists():
        shutil.copytree(run.voc, root)
        ids = ["unlabelled_0", "unlabelled_1"]
        for i, source in zip(ids, sorted((root / "JPEGImages").glob("*.jpg"))):
            shutil.copy(source, root / "JPEGImages" / f"{i}.jpg")
        (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
    return root


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.height, img.width


def test_visualize_one_png_per_image_with_a_panel_per_class(run, capsys):
    out_dir = run.base / "figures"
    code, out, err = call(visualize_cams.main, ["--tag", "tiny", "--checkpoint", "last", "--output_dir", run.exp,
                                                "--num", 3, "--out", out_dir], capsys)
    assert code == 0, err
    assert str(out_dir) in out
    split = load_split(run.voc, "main:val")
    assert sorted(p.name for p in out_dir.glob("*.png")) == sorted(f"{i}.png" for i in split.ids[:3])
    for image_id, annotation in zip(split.ids[:3], split.annotations):
        classes = int(annotation.labels.sum())
        assert png_size(out_dir / f"{image_id}.png") == visualize_cams.figure_shape(classes, SIZE)
    panel = SIZE * visualize_cams.display_scale(SIZE)
    assert visualize_cams.figure_shape(3, SIZE) == (2 * visualize_cams.TITLE_H + panel + panel // 2
                                                    + visualize_cams.LEGEND_H, 4 * panel)

    # no labels: the predicted classes (at least one) are drawn
    code, _, err = call(visualize_cams.main, ["--tag", "tiny", "--checkpoint", "last", "--output_dir", run.exp,
                                              "--data_dir", unlabelled_copy(run), "--split", "main:test",
                                              "--out", run.base / "fig_unlabelled"], capsys)
    assert code == 0, err
    pngs = sorted((run.base / "fig_unlabelled").glob("*.png"))
    assert len(pngs) == 2 and all(png_size(p)[1] % panel == 0 and png_size(p)[1] >= 2 * panel for p in pngs)


def test_visualize_uses_the_methods_keypoints(run):
    """The tile cut of the figure is cTopk-w's keypoint as core.keypoints computes it (reference rule)."""
    model = load_model(run.exp / "models" / "tiny_last.pth")
    split = load_split(run.voc, "main:val")
    image = EvalTransform(SIZE)(load_rgb_image(run.voc / "JPEGImages" / f"{split.ids[1]}.jpg"))
    sample = visualize_cams.Sample("x", image, split.annotations[1].labels)
    figure = visualize_cams.build_figure(sample, model, torch.device("cpu"), "ctopk_w", k=5, min_distance=8)
    first = int(np.flatnonzero(split.annotations[1].labels)[0])
    with torch.no_grad():
        cam = make_cams(model(image[None])[1])[0, first]
    keypoint = topk_weighted_cuts(upsample_maps(cam[None], (SIZE, SIZE)), 5, 8)
    assert figure.cut.tolist() == keypoint[0].tolist()
    assert figure.points[0]["ctopk_w"].tolist() == keypoint[0].tolist()
    assert figure.tiles.shape == (4, SIZE // 2, SIZE // 2, 3)


# ----------------------------------------------------------------------------- compare_experiments.py
@pytest.fixture(scope="module")
def runs_dir(run) -> Path:
    """Two histories, an evaluation output and a broken file."""
    folder = run.base / "compare"
    (folder / "data").mkdir(parents=True)
    other = json.loads(json.dumps(run.history))
    other["config"].update(tag="other", strategy="max")
    other["validation"].append({"epoch": 1.5, "iteration": 6, "mAP": 99.0, "mAP_voc": 98.0, "best_mAP": 99.0})
    (folder / "data" / "tiny.json").write_text(json.dumps(run.history))
    (folder / "data" / "other.json").write_text(json.dumps(other))
    (folder / "data" / "tiny_eval_val.json").write_text(json.dumps({"mAP": 1.0}))
    (folder / "data" / "broken.json").write_text("{not json")
    return folder


def test_compare_rows_in_markdown_and_csv(run, runs_dir, capsys):
    code, out, err = call(compare_experiments.main, ["--dir", runs_dir, "--runs"], capsys)
    assert code == 0 and err.count("warning") == 1 and "broken.json" in err
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| tag |")
    best = max(v["mAP"] for v in run.history["validation"])
    assert lines[3].startswith("| tiny |") and f"| {best:.2f} |" in lines[3]
    assert f"| 3/{run.history['total_iterations']} |" in lines[3]
    assert lines[2].startswith("| other |") and "| 99.00 | 1.5 |" in lines[2]

    code, out, _ = call(compare_experiments.main, ["--dir", runs_dir, "--runs", "--format", "csv"], capsys)
    rows = {r["tag"]: r for r in csv.DictReader(out.strip().splitlines())}
    assert code == 0 and set(rows) == {"tiny", "other"}
    tiny = rows["tiny"]
    assert float(tiny["best_mAP"]) == best and tiny["strategy"] == "ctopk_w" and tiny["architecture"] == "resnet18"
    assert float(tiny["mAP_voc_at_best"]) == run.history["validation"][-1]["mAP_voc"]
    assert int(tiny["iterations"]) == 3 and float(tiny["wall_time_s"]) == run.history["wall_time"]
    assert float(rows["other"]["best_mAP"]) == 99.0 and float(rows["other"]["last_mAP"]) == 99.0


def test_compare_plot(runs_dir, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    code, _, err = call(compare_experiments.main, ["--dir", runs_dir, "--runs", "--plot", tmp_path / "curves.png"],
                        capsys)
    assert code == 0, err
    assert png_size(tmp_path / "curves.png")[1] > 100


# ----------------------------------------------------------------------------- infer.py
def test_infer_labels_and_scores_match_a_direct_computation(run, capsys):
    model = load_model(run.exp / "models" / "tiny_best.pth")
    paths = sorted((run.voc / "JPEGImages").glob("*.jpg"))[:2]
    probs = []
    for path in paths:
        image = load_rgb_image(path)
        image = image.resize(long_side_size(image.width, image.height, SIZE), Image.BICUBIC)
        with torch.no_grad():
            probs.append(torch.sigmoid(model(EvalTransform(SIZE)(image)[None])[0][0]))
    threshold = float(probs[0].sort(descending=True).values[3]) - 1e-6  # 4 labels for the first image
    cams = run.base / "infer_cams"
    code, out, err = call(infer.main, [*paths, "--tag", "tiny", "--output_dir", run.exp, "--threshold", threshold,
                                       "--save_cam", cams], capsys)
    assert code == 0, err
    provenance, lines = out.strip().splitlines()[:2], out.strip().splitlines()[2:]  # '# checkpoint', '# trained with'
    assert provenance[0].startswith("# checkpoint") and provenance[1].startswith("# trained with")
    assert len(lines) == 3 and str(cams) in lines[-1]
    saved = 0
    for path, line, p in zip(paths, lines, probs):
        want = sorted(((VOC_CLASSES[c], float(p[c])) for c in range(20) if p[c] > threshold), key=lambda x: -x[1])
        head, _, listed = line.partition(": ")
        assert head == str(path)
        got = [(item.split()[0], float(item.split()[1])) for item in listed.split(", ")] if want else []
        assert [name for name, _ in got] == [name for name, _ in want]
        assert all(abs(g - w) < 6e-5 for (_, g), (_, w) in zip(got, want))
        with Image.open(path) as img:
            fitted = long_side_size(img.width, img.height, SIZE)
        for name, _ in want:
            assert png_size(cams / f"{path.stem}_{name}.png") == (fitted[1], fitted[0])
        saved += len(want)
    assert len(list(cams.glob("*.png"))) == saved >= 4


# ----------------------------------------------------------------------------- tensorboard
class FakeWriter:
    def __init__(self) -> None:
        self.scalars, self.images = [], []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))

    def add_images(self, tag, images, step, dataformats):
        self.images.append((tag, images, step, dataformats))


def test_tensorboard_helpers_follow_their_contract(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert make_writer(tmp_path / "tb") is None
    images, cams = torch.randn(6, 3, 64, 48), torch.rand(6, 1, 4, 3)
    for fn, args in ((log_scalars, ({"a": 1.0},)), (log_cam_images, (images, cams))):
        fn(None, 3, *args)  # None writer: silently nothing
    close_writer(None)
    writer = FakeWriter()
    log_scalars(writer, 7, {"train/loss": torch.tensor(0.5), "val/mAP": 40, "note": "x", "none": None})
    assert writer.scalars == [("train/loss", 0.5, 7), ("val/mAP", 40.0, 7)]
    log_cam_images(writer, 7, images, cams[:, 0])
    tag, grid, step, fmt = writer.images[0]
    assert (tag, step, fmt) == ("cams", 7, "NHWC") and grid.shape == (4, 64, 48, 3) and grid.dtype == np.uint8
    assert np.array_equal(grid, cam_overlays(images, cams))


# ----------------------------------------------------------------------------- bad input
def bad_cases(run) -> list[tuple[str, object, list, str]]:
    text_file = run.base / "not_an_image.jpg"
    text_file.write_text("hello")
    image = sorted((run.voc / "JPEGImages").glob("*.jpg"))[0]
    exp = ["--output_dir", run.exp]
    return [
        ("evaluate unknown tag", evaluate_classification.main, ["--tag", "nope", *exp], "nope_best.pth"),
        ("visualize unknown tag", visualize_cams.main, ["--tag", "nope", *exp], "unknown --tag nope"),
        ("infer unknown tag", infer.main, [image, "--tag", "nope", *exp], "unknown --tag nope"),
        ("missing checkpoint", evaluate_classification.main, ["--tag", "tiny", "--checkpoint",
                                                              run.base / "gone.pth", *exp], "gone.pth"),
        ("no tag nor checkpoint", infer.main, [image], "--checkpoint PATH"),
        ("bad image path", infer.main, [run.base / "missing.jpg", "--tag", "tiny", *exp], "missing.jpg"),
        ("non-image file", infer.main, [text_file, "--tag", "tiny", *exp], "not_an_image.jpg"),
        ("non-image to visualize", visualize_cams.main, ["--tag", "tiny", *exp, "--images", text_file],
         "not_an_image.jpg"),
        ("split without labels", evaluate_classification.main, ["--tag", "tiny", *exp, "--data_dir",
                                                                 unlabelled_copy(run), "--split", "main:test"],
         "no annotations"),
        ("bad scales", evaluate_classification.main, ["--tag", "tiny", *exp, "--scales", "1,-2"], "--scales"),
        ("bad threshold", infer.main, [image, "--tag", "tiny", *exp, "--threshold", "2"], "--threshold"),
        ("no histories", compare_experiments.main, ["--dir", run.base / "empty"], "data/"),
        ("unknown flag", evaluate_classification.main, ["--tag", "tiny", "--nope"], "--nope"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(run, capsys):
    for name, main, argv, words in bad_cases(run):
        code, _, err = call(main, argv, capsys)
        assert words in one_error_line(code, err), name


def test_plot_without_matplotlib_is_one_line(runs_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    code, out, err = call(compare_experiments.main, ["--dir", runs_dir, "--runs", "--plot", tmp_path / "p.png"], capsys)
    assert one_error_line(code, err) == "error: --plot needs matplotlib (pip install matplotlib)" and not out


def test_scripts_run_from_the_command_line(run, tmp_path):
    """The real entry points, two interpreters in parallel: a bad tag is one stderr line and exit code 2;
    every script's --help works (run as __main__ in one interpreter, to pay torch's import once)."""
    helps = ("import runpy, sys\n"
             "for script in sys.argv[1:]:\n"
             "    sys.argv = [script, '--help']\n"
             "    try:\n"
             "        runpy.run_path(script, run_name='__main__')\n"
             "    except SystemExit as exc:\n"
             "        assert exc.code == 0, script\n")
    scripts = [str(ROOT / f"{name}.py") for name in ("evaluate_classification", "visualize_cams",
                                                      "compare_experiments", "infer")]
    commands = [[str(ROOT / "evaluate_classification.py"), "--tag", "nope", "--output_dir", str(run.exp)],
                ["-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{helps}", *scripts]]
    procs = [subprocess.Popen([sys.executable, *c], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ONE_THREAD) for c in commands]
    (_, err), (out, help_err) = (proc.communicate(timeout=120) for proc in procs)
    assert "unknown --tag nope" in one_error_line(procs[0].returncode, err)
    assert procs[1].returncode == 0, help_err
    assert out.count("usage:") == 4 and "long side is the run's --image_size" in " ".join(out.split())
