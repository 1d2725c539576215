"""The training-speed benchmark runs end to end and prints a well-formed table (no timing assertions)."""
import math
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data", "random", "--image_size", "64", "--batch_size", "4", "--iterations", "1", "--warmup", "1",
        "--repeats", "1", "--strategies", "none,ctopk_w", "--device", "cpu", "--format", "markdown"]


def table_rows(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and {strategy: cells} of the first markdown table in the output."""
    lines = [line for line in stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[1:]
    return header, {row[0]: row for row in rows}


def number(cell: str) -> float:
    return float(cell.rstrip("%x"))


def test_benchmark_prints_both_strategies_with_ratios(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), *TINY], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "torch:" in out.stdout and "machine:" in out.stdout
    header, rows = table_rows(out.stdout)
    assert set(rows) == {"none", "ctopk_w", "per-task"}
    column = {name: i for i, name in enumerate(header)}
    assert {"ms/it", "it/s", "img/s", "T", "peak MiB", "t/none", "ideal/none", "dev/none"} <= set(column)
    for name, row in rows.items():
        for key in ("ms/it", "it/s", "img/s", "peak MiB", "t/none", "ideal/none"):
            value = number(row[column[key]])
            assert math.isfinite(value) and value > 0, (name, key, row)
        assert math.isfinite(number(row[column["dev/none"]]))
    assert number(rows["none"][column["t/none"]]) == 1.0 and number(rows["none"][column["T"]]) == 0.0
    tasks = number(rows["ctopk_w"][column["T"]])
    assert 1.0 <= tasks <= 4.0  # 1-4 labels per image, one task each
    assert abs(number(rows["ctopk_w"][column["ideal/none"]]) - round((3 + tasks) / 3, 2)) <= 0.011
    assert number(rows["per-task"][column["T"]]) == tasks  # the same batches, the same tasks
    # the report ends with the one-line comparison per configuration
    last = out.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"ctopk_w vs per-task loop: (\d+\.\d\d)x \(ours (\d+\.\d\d) s/it, per-task (\d+\.\d\d) s/it\)",
                         last)
    assert match, last
    assert float(match[2]) > 0 and float(match[3]) > 0


def test_gpu_check_says_no_cuda_in_one_line_and_exits_2(tmp_path):
    """Where CUDA is missing (this CPU machine), benchmarks/gpu_check.sh runs nothing: one line, exit 2."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: gpu_check.sh would run the full check")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), sys.executable], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"gpu_check: no CUDA device visible to {sys.executable} (torch.cuda.is_available() "
                                  "is False); nothing was run")
