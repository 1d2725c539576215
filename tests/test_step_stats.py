"""The step's named statistics: a loss term added in core/step.py alone reaches the total, the history and the
log; and a short run's numbers are pinned bit for bit against a digest taken before the refactor of issue 23."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import core.step
from core.config import parse_args
from core.runtime import processor_name
from core.trainer import train

# a cTopk-w run (CSI head, EMA teacher, grouped BatchNorm, tile calls) on the tiny VOC set, one thread
SHORT_RUN = ["--train_split", "main:train", "--val_split", "main:val", "--architecture", "resnet18", "--mode",
             "normal", "--pretrained", "none", "--image_size", "64", "--min_image_size", "48", "--max_image_size",
             "80", "--batch_size", "4", "--num_workers", "0", "--lr", "0.01", "--min_distance", "8", "--max_iterations",
             "4", "--max_epoch", "1", "--reference_gpus", "2", "--seed", "0", "--print_ratio", "0.5"]
CTOPK_W = {"strategy": "ctopk_w", "head": "csi", "alpha_re": 3.0, "alpha_schedule_re": 0.05, "alpha_p": 0.5}
# the three recipes of the guard runs: cTopk-w; Max as its --demo trains it (GAP head, one tile call); the baseline
GUARDED = {
    "ctopk_w": (CTOPK_W, []),
    "max": ({**CTOPK_W, "strategy": "max"}, ["--head", "gap", "--tile_calls", "batch"]),
    "none": ({"strategy": "none", "head": "gap"}, []),
}
# sha256 of run_digest's text for SHORT_RUN, taken at commit db580f1 (before the refactor of issue 23), torch
# 2.14.1, one thread. The floats depend on the kernels the CPU gets (oneDNN and ATen pick them by instruction
# set), so the digests are pinned per kind of CPU; db580f1 and this code give the same digests on each kind below.
PINNED_DIGESTS = {
    ("AMD", "AVX2"): {
        "ctopk_w": "bf0c17c05c1d35dfaca735c90770c1d4a2eb4e7eeb57df62d48329a7b5f530bf",
        "max": "82436ac7edfb7addf5c92b679968c546938b8527023d58d0614481efc3fe96e6",
        "none": "324f7985a329bd1e0009de28b7479e6351509bd16b2dc8bdfdb80f4f74d74228",
    },
    ("Intel", "AVX512"): {
        "ctopk_w": "8738120269182ed78063ac678e4e21d5cba4d5d6fab313e5737ed7b95b012629",
        "max": "2bf0fb5ee40e31191c6a7a47fd21dd84b0539441f88ecd232cabfce18569e4b5",
        "none": "76b9912b53da48d697134afbcacb455fdc563696609b65bfb00cf094adb48d4f",
    },
}


def cpu_kind() -> tuple[str, str]:
    """(vendor, torch's CPU capability): what decides which float kernels a run gets."""
    name = processor_name()
    vendor = "AMD" if "AMD" in name else "Intel" if "Intel" in name else name
    return vendor, torch.backends.cpu.get_cpu_capability()


def run_digest(history: dict, scores_file) -> str:
    """Every number the run computed: train rows and validation records (less wall times and file hashes)
    and the per-image scores file, as exact text (floats by repr, arrays by their bytes)."""
    train_rows = [{k: v for k, v in row.items() if k != "seconds_per_iteration"} for row in history["train"]]
    validation = [{k: v for k, v in rec.items() if k != "checkpoints"} for rec in history["validation"]]
    text = json.dumps({"train": train_rows, "validation": validation}, sort_keys=True)
    with np.load(scores_file) as saved:
        arrays = {key: hashlib.sha256(saved[key].tobytes()).hexdigest() for key in sorted(saved.files)}
    return hashlib.sha256((text + json.dumps(arrays, sort_keys=True)).encode()).hexdigest()


def short_run(tiny_voc, out, argv=(), recipe="ctopk_w"):
    defaults, flags = GUARDED[recipe]
    args = parse_args(defaults, ["--data_dir", str(tiny_voc), *SHORT_RUN, *flags, "--output_dir", str(out),
                                 "--tag", "t", *argv])
    return train(args)


@pytest.mark.parametrize("recipe", list(GUARDED))
def test_a_short_run_computes_what_it_computed_before_the_refactor(recipe, tiny_voc, tmp_path, single_thread):
    kind = cpu_kind()
    pinned = PINNED_DIGESTS.get(kind)
    if pinned is None:
        pytest.skip(f"no digests pinned for a {kind} CPU; compute the digests of its runs with commit db580f1 "
                    "on one to add them")
    history = short_run(tiny_voc, tmp_path, recipe=recipe)
    assert [row["iteration"] for row in history["train"]] == [2, 4]
    assert run_digest(history, tmp_path / "data" / "t_val_scores.npz") == pinned[recipe]


def test_a_loss_term_added_in_the_step_reaches_the_total_the_history_and_the_log(tiny_voc, tmp_path, monkeypatch,
                                                                               single_thread):
    """The one place a term is added is core/step.py loss_terms; the trainer is not touched."""
    original = core.step.loss_terms
    weight = 0.25
    seen = []

    def with_extra_term(ctx, images, labels, labels_cpu, alpha_re):
        terms, others, checks = original(ctx, images, labels, labels_cpu, alpha_re)
        extra = core.step.LossTerm("logit_norm_loss", weight, terms[0].value * 0 + images.float().abs().mean())
        seen.append(([t.value.detach().clone() for t in terms] + [extra.value.detach().clone()], alpha_re))
        return [*terms, extra], others, checks

    monkeypatch.setattr(core.step, "loss_terms", with_extra_term)
    history = short_run(tiny_voc, tmp_path, ["--max_iterations", "2", "--print_ratio", "0.25"])
    row = history["train"][-1]
    names = list(row)
    assert names.index("re_loss") + 1 == names.index("logit_norm_loss") < names.index("alpha_re")
    (class_loss, p_class, re, extra), alpha_re = seen[-1]
    assert row["logit_norm_loss"] == pytest.approx(float(extra), rel=1e-6)
    total = class_loss + 0.5 * p_class + alpha_re * re + weight * extra
    assert row["loss"] == pytest.approx(float(total), rel=1e-5)
    log = (tmp_path / "logs" / "t.txt").read_text()
    assert f"logit_norm {float(extra):.4f} alpha_re" in log


def test_step_stats_read_by_name_and_by_position():
    losses = {"loss": torch.tensor(3.0), "class_loss": torch.tensor(1.0), "p_class_loss": torch.tensor(2.0)}
    stats = core.step.StepStats.of(losses, {"tasks_per_batch": torch.tensor(4.0)}, {"cuts_outside": torch.tensor(0.0)})
    assert stats.loss_names == ("loss", "class_loss", "p_class_loss")
    assert stats.logged_names == (*stats.loss_names, "tasks_per_batch")  # checks are read, not logged
    assert float(stats["tasks_per_batch"]) == 4.0 and stats[1:3].tolist() == [1.0, 2.0]
