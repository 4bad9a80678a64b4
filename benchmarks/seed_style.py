"""Peak memory against sequence length: the seed blog post's segment loops versus TBPTTCallback.

The blog post this project started from loops over segments inside ``training_step``, adds every segment's loss to
one ``loss`` and returns it, so Lightning calls ``backward`` once per batch, after the last segment. Until then the
graph of every segment is alive, whether or not the state is detached between segments:

* ``seed ex. 1`` (blog example 1): the state is carried *without* detaching, so the one backward goes through the
  whole sequence (full BPTT, computed segment by segment);
* ``seed ex. 2/3`` (blog examples 2 and 3): the state is detached after every segment, so gradients are truncated,
  but the summed loss still holds every segment's graph until the backward (example 2's overlap is left out: with
  its half-window overlap the loop keeps about twice as many steps);
* ``callback``: ``TBPTTCallback(k)`` on an unmodified module: one backward and optimizer step per segment, the state
  detached;
* ``callback, step_per=batch``: ``TBPTTCallback(k, step_per="batch")``: the blog's semantics for examples 2 and 3
  (segment losses summed, one optimizer step per batch), each segment backpropagated as soon as it is done.

Every run is a fresh process (its peak resident set size is reported) on the task of ``benchmarks/memory.py``:
``lanes`` noisy sine waves of ``T`` steps, one batch holding the whole waves, an LSTM predicting the next value, the
loss a mean squared error at every step. A seed-style loop is not run at a length at which its peak, extrapolated
from its two previous lengths, would exceed ``--max-mib``. Prints the measurements, a markdown table and the ratios
against the callback; ``--plot`` writes a PNG (needs matplotlib).

    python benchmarks/seed_style.py --plot docs/images/seed_style.png
    python benchmarks/seed_style.py --quick   # tiny sizes, one length, for the test suite
"""

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure, next_value_class, peak_mib, plot, quiet_trainer, whole_batch_loader, write_waves

MODES = {
    "seed-carry": "seed ex. 1 (no detach)",
    "seed-detach": "seed ex. 2/3 (detach)",
    "callback": "callback",
    "callback-batch": "callback, step_per=batch",
}
SEED_MODES = ("seed-carry", "seed-detach")


def seed_style_class(detach: bool) -> type:
    """The blog's loop over segments in ``training_step``, on the memory benchmark's model and loss."""
    import torch
    import torch.nn.functional as F

    class SeedStyle(next_value_class()):
        def __init__(self, hidden_size: int, segment_length: int) -> None:
            super().__init__(hidden_size)
            self.hidden_size, self.seq_len = hidden_size, segment_length

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch["input"].unsqueeze(-1), batch["target"]
            h = (
                torch.zeros(1, x.size(0), self.hidden_size).to(self.device),
                torch.zeros(1, x.size(0), self.hidden_size).to(self.device),
            )
            loss = 0
            for t in range(0, x.size(1), self.seq_len):
                out, h = self.lstm(x[:, t : t + self.seq_len], h)
                loss += F.mse_loss(self.head(out).squeeze(-1), y[:, t : t + self.seq_len])
                if detach:
                    h = tuple(state.detach() for state in h)
            self.log("train_loss", loss)
            return loss  # Lightning calls backward once, on the sum of every segment's loss

    return SeedStyle


def probe(mode: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Train one epoch (one batch) in this process; return the peak RSS (MiB), seconds and the final loss."""
    import time

    from lightning_tbptt import TBPTTCallback

    k = args.segment_length
    callbacks = {"callback": [TBPTTCallback(k)], "callback-batch": [TBPTTCallback(k, step_per="batch")]}
    trainer = quiet_trainer(callbacks.get(mode, []))
    if mode in SEED_MODES:
        model = seed_style_class(detach=mode == "seed-detach")(args.hidden_size, k)
    else:
        model = next_value_class()(args.hidden_size)
    loader = whole_batch_loader(path)
    start = time.perf_counter()
    trainer.fit(model, loader)
    return {"peak_mib": peak_mib(), "seconds": time.perf_counter() - start}


def extrapolate(points: list[tuple[int, float]], length: int) -> float:
    """The peak at ``length`` on the line through the last two measured points (through the origin with one)."""
    if not points:
        return 0.0
    if len(points) == 1:
        (t, m) = points[0]
        return m * length / t
    (t0, m0), (t1, m1) = points[-2:]
    return m1 + (m1 - m0) / (t1 - t0) * (length - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 3_000, 10_000, 30_000, 100_000])
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--segment-length", type=int, default=100)
    parser.add_argument("--max-mib", type=float, default=5000.0, help="skip seed-style runs predicted above this")
    parser.add_argument("--jobs", type=int, default=1, help="probes run at once (seconds are only comparable at 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one length, probes in parallel")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot to this PNG file")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.lanes, args.hidden_size, args.segment_length, args.jobs = [300], 2, 4, 50, len(MODES)
    args.forward = [f"--hidden-size={args.hidden_size}", f"--segment-length={args.segment_length}"]
    if args.probe:
        mode, path = args.probe
        print(json.dumps(probe(mode, Path(path), args)))
        return

    print(
        f"LSTM H={args.hidden_size}, {args.lanes} lanes, segments of {args.segment_length} steps, one batch holding"
        f" the whole waves, one torch thread, one process per run; seed-style runs skipped above {args.max_mib:.0f}"
        " MiB (extrapolated)"
    )
    rows: list[tuple[str, int, dict[str, float]]] = []
    skipped: set[tuple[str, int]] = set()
    print(f"{'':26}{'T':>8}{'peak MiB':>11}{'seconds':>10}")
    with tempfile.TemporaryDirectory() as directory, ThreadPoolExecutor(args.jobs) as pool:
        for length in sorted(args.lengths):
            path = Path(directory) / f"waves-{length}.npy"
            write_waves(path, args.lanes, length)
            modes = []
            for mode in MODES:
                measured = [(n, r["peak_mib"]) for m, n, r in rows if m == mode]
                if mode in SEED_MODES and extrapolate(measured, length) > args.max_mib:
                    skipped.add((mode, length))
                    print(f"{MODES[mode]:26}{length:>8}  skipped: {extrapolate(measured, length):.0f} MiB predicted")
                else:
                    modes.append(mode)
            results = pool.map(measure, modes, [path] * len(modes), [args] * len(modes), [__file__] * len(modes))
            for mode, result in zip(modes, results, strict=True):
                rows.append((mode, length, result))
                print(f"{MODES[mode]:26}{length:>8}{result['peak_mib']:>11.1f}{result['seconds']:>10.2f}", flush=True)
            path.unlink()

    def peak(mode: str, length: int) -> float | None:
        return next((r["peak_mib"] for m, n, r in rows if m == mode and n == length), None)

    lengths = sorted(args.lengths)
    print("\npeak resident memory (MiB):\n")
    print("| run | " + " | ".join(f"T = {n:,}" for n in lengths) + " |")
    print("|---|" + "---:|" * len(lengths))
    for mode, label in MODES.items():
        cells = []
        for n in lengths:
            value = peak(mode, n)
            cells.append(f"{value:,.1f}" if value else ("skipped" if (mode, n) in skipped else ""))
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    for mode in (*SEED_MODES, "callback-batch"):
        ratios = [
            f"T={n}: {peak(mode, n) / peak('callback', n):.2f}x"
            for n in lengths
            if peak(mode, n) and peak("callback", n)
        ]
        print(f"{MODES[mode]} / callback: " + ", ".join(ratios))
    for mode in (*SEED_MODES, "callback"):
        measured = [(n, r["peak_mib"]) for m, n, r in rows if m == mode]
        if len(measured) >= 2:
            (t0, m0), (t1, m1) = measured[-2:]
            print(f"{MODES[mode]}: {1024 * (m1 - m0) / (t1 - t0):.1f} KiB per added time step (T={t0} to T={t1})")
    if args.plot:
        plot(rows, args.plot, MODES, "Peak memory: seed-style loops against TBPTTCallback")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
