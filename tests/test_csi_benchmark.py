"""benchmarks/csi_head.py at toy shapes: its functions and its command line still work (no timing assertions)."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "csi_head.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("csi_head_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_measure_both_variants_in_process() -> None:
    bench = load_benchmark()
    shape = bench.Shape(batch=2, channels=16, classes=3, size=4)
    results = {v: bench.measure(v, shape, torch.device("cpu"), warmup=1, repeats=2) for v in bench.VARIANTS}
    for result in results.values():
        assert len(result["times_ms"]) == 2 and all(t > 0 for t in result["times_ms"])
        assert math.isfinite(result["peak_mib"]) and result["tensor_peak_mib"] > 0
    merged = bench.merge_rounds([results["fused"], results["fused"]])
    assert len(merged["times_ms"]) == 4 and merged["peak_mib"] == results["fused"]["peak_mib"]
    literal, fused = (torch.tensor(results[v]["logits"]) for v in ("literal", "fused"))
    assert literal.shape == (2, 3)
    assert torch.allclose(fused, literal, rtol=1e-4, atol=1e-5)


def test_command_line_prints_table_and_ratios(tmp_path) -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--batch", "2", "--channels", "16",
                          "--classes", "3", "--size", "4", "--warmup", "0", "--repeats", "1", "--threads", "1",
                          "--rounds", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| literal", "| fused"))]
    assert len(rows) == 2
    for line in ("fused/literal peak memory:", "fused/literal tensor peak memory:", "fused vs literal time:"):
        assert line in out.stdout
    gap = next(line for line in out.stdout.splitlines() if line.startswith("logits, max"))
    assert float(gap.split(":")[-1]) < 1e-4
