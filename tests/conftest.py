import os
import sys
from pathlib import Path

# One compute thread per process: the suite starts many small training processes on a 2-core
# machine, and OpenMP threads that spin-wait for a busy core slow tiny models down by 10x or more.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# the repo root holds the `core` and `tools` packages and the training scripts
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402

from tools.demo_data import generate_demo_dataset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A tiny VOC-format set (16 train + 10 val images, 48-64 px) for smoke runs; treat as read-only."""
    return generate_demo_dataset(tmp_path_factory.mktemp("voc") / "tiny", num_train=16, num_val=10,
                                 min_side=48, max_side=64, seed=1)


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's in-process training runs, whatever OMP_NUM_THREADS says."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_BACKBONE = {"train_images": 64, "test_images": 32, "epochs": 1, "batch_size": 32}


@pytest.fixture(scope="session", autouse=True)
def tiny_demo_backbone(tmp_path_factory):
    """`--pretrained demo` (the --demo default) in every test, in-process or in a subprocess, loads a tiny demo
    backbone prebuilt into a private cache, instead of pretraining the real one (minutes) in ~/.cache/oass."""
    from tools import demo_backbone

    cache = tmp_path_factory.mktemp("oass_cache")
    before = os.environ.get("OASS_CACHE")
    os.environ["OASS_CACHE"] = str(cache)
    saved_recipe = dict(demo_backbone.RECIPE)
    demo_backbone.RECIPE.update(TINY_BACKBONE)
    demo_backbone.demo_backbone_state(log=lambda line: None)
    yield cache
    demo_backbone.RECIPE.clear()
    demo_backbone.RECIPE.update(saved_recipe)
    if before is None:
        os.environ.pop("OASS_CACHE", None)
    else:
        os.environ["OASS_CACHE"] = before
