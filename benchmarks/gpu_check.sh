#!/usr/bin/env bash
# One-command GPU check, at most about 5 minutes on one GPU:
#   1. tests/test_cuda.py (CSI head and grouped BatchNorm against their literal forms, fp32 and bf16 autocast;
#      device normalisation; one step of every strategy) with pytest, or its own runner where pytest is missing;
#   2. benchmarks/train_speed.py: every strategy at ResNet-50 / 512 px / batch 32, fp32 and bf16, random
#      batches, with cTopk-w's ratio against the per-task loop and the peak memory.
# Usage: bash benchmarks/gpu_check.sh [python]   (default python3; PYTHON=... works too)
# Exit: 0 all passed; 1 a test or the benchmark failed (or ran out of its time); 2 no CUDA device here.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${1:-${PYTHON:-python3}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device visible to $PY (torch.cuda.is_available() is False); nothing was run" >&2
    exit 2
fi
"$PY" -c "import torch; print('# gpu_check on', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

status=0
if "$PY" -m pytest --version >/dev/null 2>&1; then
    echo "# 1/2 CUDA tests: $PY -m pytest tests/test_cuda.py (pytest found)"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=1
else
    echo "# 1/2 CUDA tests: $PY tests/test_cuda.py (pytest not installed: the file's own runner)"
    timeout 150 "$PY" tests/test_cuda.py || status=1
fi

echo "# 2/2 speed: every strategy, ResNet-50 / 512 px / batch 32, fp32 and bf16 (random batches)"
timeout 150 "$PY" benchmarks/train_speed.py --device cuda --configs r50_512 --amp off,bf16 --data random \
    --iterations 3 --warmup 1 --repeats 1 || status=1

echo "# gpu_check: $([ $status -eq 0 ] && echo 'all passed' || echo 'FAILED (see above)')"
exit $status
