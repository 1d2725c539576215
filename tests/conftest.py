import sys
from pathlib import Path

# the repo root holds the `core` and `tools` packages and the training scripts
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
