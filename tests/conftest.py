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
