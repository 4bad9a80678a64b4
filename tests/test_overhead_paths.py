"""``benchmarks/overhead.py --tiny --compare-paths`` runs and prints the fast paths against Lightning's own paths."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tiny_overhead_benchmark_compares_the_fast_paths_with_lightnings():
    args = ["--tiny", "--compare-paths", "--length", "32", "--batches", "2", "--rounds", "1"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("LSTM H=8, B=4, k=8, T=32: ")
    for method in ("raw PyTorch loop", "manual Lightning loop", "TBPTTCallback", "TBPTTCallback, no fast paths"):
        (row,) = [line for line in lines if line.startswith(method + " ")]
        assert all(float(value) > 0 for value in row[len(method) :].split())
    assert any(line.startswith("fast paths against Lightning's paths: ") for line in lines)
