"""The benchmark scripts keep working (tiny sizes; the numbers themselves are measured by running the scripts)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tbptt import RandomLengths, TBPTTCallback

ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    return result.stdout.splitlines()


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_variable_length_benchmark_runs_and_prints_the_four_methods():
    tiny = ["--hidden-size", "8", "--input-size", "2", "--batch-size", "4", "--length", "64", "--segment-length", "16"]
    lines = run_script("variable_length.py", *tiny, "--batches", "2", "--rounds", "1")
    rows = {}
    for method in ("every padded step", "lengths (skip ended)", "lengths + drop_finished", "packed + drop_finished"):
        (row,) = [line for line in lines if line.startswith(method)]
        rows[method] = [float(v) for v in row[len(method) :].split()]  # (tiny batches may print 0.00 s)
        assert len(rows[method]) == 4
    assert rows["every padded step"][2] == 1.0, "ratios are against the padded run"


@pytest.mark.slow  # a benchmark script run in a subprocess
@pytest.mark.parametrize("extra", [[], ["--log", "--log-every", "both"]], ids=["default", "log-every-both"])
def test_overhead_benchmark_runs_and_prints_the_three_methods(extra):
    args = ["--hidden-size", "8", "--input-size", "2", "--batch-size", "2", "--length", "64", "--batches", "2", *extra]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), *args, "--segment-length", "16", "--rounds", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    lines = result.stdout.splitlines()
    methods = ["raw PyTorch loop", "manual Lightning loop", "TBPTTCallback"] + ["TBPTTCallback, per batch"] * bool(
        extra
    )
    for method in methods:
        (row,) = [line for line in lines if line.startswith(method + " ")]
        ms, fastest, vs_raw, vs_manual = (float(v) for v in row[len(method) :].split())
        assert ms > 0 and fastest > 0 and vs_raw > 0 and vs_manual > 0
    assert any(line.startswith("log_every='step' against 'batch': ") for line in lines) == bool(extra)


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_memory_benchmark_runs_every_mode_and_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "memory.png"
    tiny = ["--lanes", "2", "--hidden-size", "4", "--segment-length", "50", "--batch-steps", "100"]
    lines = run_script("memory.py", *tiny, "--lengths", "300", "--full-lengths", "300", "--plot", str(plot))
    for label in ("callback, training", "callback, evaluation", "full BPTT, training", "unsplit evaluation"):
        (row,) = [line for line in lines if line.startswith(label + " ")]
        length, peak, seconds = (float(v) for v in row[len(label) :].split())
        assert length == 300 and peak > 0 and seconds >= 0
    assert any(line.startswith("full BPTT / callback training at T=300:") for line in lines)
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_seed_style_benchmark_runs_every_mode_and_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "seed_style.png"
    lines = run_script("seed_style.py", "--quick", "--plot", str(plot))
    for label in ("seed ex. 1 (no detach)", "seed ex. 2/3 (detach)", "callback", "callback, step_per=batch"):
        (row,) = [line for line in lines if line.startswith(f"{label} ") and line[len(label) :].split()[0] == "300"]
        length, peak, seconds = (float(v) for v in row[len(label) :].split())
        assert length == 300 and peak > 0 and seconds >= 0
        assert any(line.startswith(f"| {label} | ") for line in lines), "the markdown table has a row per mode"
    assert any(line.startswith("seed ex. 1 (no detach) / callback: T=300:") for line in lines)
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_packed_benchmark_runs_every_method_and_computes_the_same_losses():
    lines = run_script("packed.py", "--quick")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| lengths")]
    assert len(rows) == 3 * 3, "three methods for each of three length distributions"
    for row in rows:
        ms, ratio = (float(v) for v in row.strip("| ").split(" | ")[-2:])
        assert ms > 0 and ratio > 0
    dloss = [
        float(line.split()[-1]) for line in lines if re.fullmatch(r"\d\.\d+e[+-]\d+", line.split()[-1] if line else "")
    ]
    assert len(dloss) == 3 * 3 and max(dloss) < 1e-4, "padded, dropped and packed segments give the same losses"


@pytest.mark.slow  # a benchmark script run in fresh subprocesses
def test_exact_benchmark_runs_every_mode_and_prints_the_ratios():
    tiny = ["--lengths", "64", "128", "--hidden-sizes", "8", "--input-size", "2", "--batch-size", "2"]
    lines = run_script("exact.py", *tiny, "--segment-length", "16", "--full-max-length", "64")
    rows = [line.split() for line in lines if re.match(r"\s+8\s+(64|128)\s", line)]
    modes = [(int(row[1]), " ".join(row[2:-2])) for row in rows]
    assert modes == [(64, "full BPTT"), (64, "exact"), (64, "truncated"), (128, "exact"), (128, "truncated")]
    assert all(float(row[-2]) > 0 for row in rows)
    (ratios,) = [line for line in lines if line.startswith("H=8 T=64: exact / truncated time")]
    assert "exact / full BPTT memory" in ratios
    assert any(line.startswith("H=8 T=128: exact / truncated time") for line in lines)


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_lag_benchmark_runs_every_configuration():
    tiny = ["--lag", "4", "--length", "16", "--hidden-size", "8", "--batch-size", "4", "--batches", "2"]
    lines = run_script("lag.py", *tiny, "--epochs", "1", "--eval-size", "8")
    steps = {}
    for line in lines:
        match = re.match(r"(.+?)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", line)
        if match:
            steps[match[1]] = int(match[2])
            assert 0 <= float(match[4]) <= 1

    # one step per segment (16 / k per batch, or the lengths drawn for each of the 2 batches), per window
    # ((16 - 8) / 2 + 1), per batch (exact and full BPTT)
    def drawn(k: int, rule: str) -> int:
        callback = TBPTTCallback(k, random_lengths=RandomLengths(rule))  # type: ignore[arg-type]
        return sum(callback.training_segments(16, epoch=0, batch=b) for b in range(2))

    assert steps == {
        "TBPTT k=1 (L/4)": 32,
        "TBPTT k=2 (L/2)": 16,
        "TBPTT k=4 (L)": 8,
        "random k~4 (L, AWD)": drawn(4, "awd"),
        "random k~2 (L/2, AWD)": drawn(2, "awd"),
        "random first cut k=4 (L)": drawn(4, "offset"),
        "TBPTT k=8 (2L)": 4,
        "windows 8/2 (2L/L/2)": 10,
        "exact k=1 (L/4)": 2,
        "full BPTT": 2,
    }


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_probe_benchmark_runs_every_part():
    tiny = ["--lag", "4", "--length", "16", "--bias-length", "32", "--horizon", "8", "--hidden-size", "8"]
    lines = run_script(
        "probe.py", *tiny, "--batch-size", "4", "--batches", "4", "--epochs", "1", "--warm-batches", "2",
        "--eval-size", "8", "--probe-every", "2",
    )  # fmt: skip
    rows = [line.split() for line in lines if line.startswith(("copy task,", "linear recurrence"))]
    # 2 + 2 (copy task at initialisation and trained) + 2 (two linear recurrences) models, lengths 2, 4, 8 (< 32 / 2)
    assert len(rows) == 4 * 3
    decay = {line.split()[0]: float(line.split()[1]) for line in lines if re.match(r"\s+0\.\d+\s+0\.\d+\s", line)}
    assert decay.keys() == {"0.5", "0.8", "0.9", "0.95", "0.99"}
    for a, rate in decay.items():
        assert abs(rate - float(a)) < 1e-4
    (auto,) = [line for line in lines if line.startswith("auto 2..16, probe_every=2")]
    steps, seconds, accuracy, *chosen = auto.split()[3:]
    assert float(seconds) >= 0
    assert int(steps) > 0 and 0 <= float(accuracy) <= 1 and len(chosen) == 2  # probes before batches 0 and 2
    assert all(length in {"2", "4", "8", "16"} for length in chosen)
    assert any(line.startswith("probe 4k against direct: largest |probe - direct|") for line in lines)
    assert any(line.startswith("a probe took") for line in lines)


@pytest.mark.slow  # a benchmark script run in a subprocess
def test_gpu_check_runs_on_the_cpu_with_its_gpu_parts_skipped():
    lines = run_script("gpu_check.py", "--device", "cpu", "--quick")  # exits 1 if a check fails
    summary = [line.split(None, 1) for line in lines[lines.index("summary:") + 1 : -1]]
    assert {status for status, _ in summary} <= {"PASS", "SKIP"}
    assert ["PASS", "6 dynamic evaluation, cuDNN LSTM in eval mode"] in summary
