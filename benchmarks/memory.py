"""Peak memory against sequence length: streamed TBPTT training and evaluation versus full backpropagation.

Every measurement runs in a fresh process (its peak resident set size is what is reported) on the same task: ``lanes``
noisy sine waves of ``T`` steps each, an LSTM trained to predict the next value. Lengths are per lane.

* ``callback, training``: ``TBPTTCallback(streaming=True)`` over a ``LaneDataModule`` that reads a ``.npy`` memory map
  batch by batch, one epoch;
* ``callback, evaluation``: ``Trainer.validate`` over the same stream, segmented;
* ``full BPTT, training``: one batch holding the whole sequences, no callback (one backward through all ``T`` steps);
* ``unsplit evaluation``: ``Trainer.validate`` over the whole sequences in one batch, no callback.

The data files are written by this (driver) process before the measured processes start, so generating them never
counts. Prints a table, the ratios the targets are about, and with ``--plot`` writes a PNG (needs matplotlib).

    python benchmarks/memory.py --plot docs/images/memory.png
    python benchmarks/memory.py --lengths 100000 --full-lengths --workers 2   # main process only
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

MODES = {
    "stream-train": "callback, training",
    "stream-eval": "callback, evaluation",
    "full-train": "full BPTT, training",
    "full-eval": "unsplit evaluation",
}


def write_waves(path: Path, lanes: int, length: int) -> None:
    """Write ``lanes`` noisy sine waves of ``length + 1`` steps into a ``.npy`` file, chunk by chunk."""
    generator = np.random.default_rng(0)
    waves = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(lanes, length + 1))
    phases = generator.uniform(0, 2 * np.pi, size=(lanes, 1))
    chunk = 1 << 16
    for begin in range(0, length + 1, chunk):
        steps = np.arange(begin, min(begin + chunk, length + 1))[None, :]
        noise = generator.normal(scale=0.1, size=(lanes, steps.shape[1]))
        waves[:, begin : begin + steps.shape[1]] = np.sin(0.01 * steps + phases) + noise
    waves.flush()
    del waves


def next_value_class() -> type:
    """The model every memory benchmark trains: an LSTM and a linear head predicting the next value of a wave.

    Defined in a function so that the driver process never imports torch or Lightning.
    """
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F

    class NextValue(pl.LightningModule):
        def __init__(self, hidden_size: int) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(1, hidden_size, batch_first=True)
            self.head = torch.nn.Linear(hidden_size, 1)

        def loss(self, batch: Any) -> torch.Tensor:
            out, _ = self.lstm(batch["input"].unsqueeze(-1))
            return F.mse_loss(self.head(out).squeeze(-1), batch["target"])

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.loss(batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", self.loss(batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return NextValue


def quiet_trainer(callbacks: list[Any]) -> Any:
    """One epoch, one torch thread, no logger, checkpoints, progress bar, summary or sanity check."""
    import pytorch_lightning as pl
    import torch

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def whole_batch_loader(path: Path) -> Any:
    """A loader of one batch holding the whole waves of ``path`` (input and next-value target)."""
    import torch

    waves = torch.from_numpy(np.load(path))
    return torch.utils.data.DataLoader([{"input": waves[:, :-1], "target": waves[:, 1:]}], batch_size=None)


def probe(mode: str, path: Path, args: argparse.Namespace) -> dict[str, float]:
    """Run one measurement in this process and return its peak RSS (MiB) and seconds."""
    from lightning_tbptt import LaneDataModule, TBPTTCallback

    streamed = mode.startswith("stream")
    callbacks = [TBPTTCallback(args.segment_length, streaming=True, resets="starts")] if streamed else []
    trainer = quiet_trainer(callbacks)
    if streamed:
        waves = np.load(path, mmap_mode="r")  # read batch by batch from the memory map: lane j is wave j
        sequences = [waves[lane] for lane in range(waves.shape[0])]
        data = LaneDataModule(
            sequences, sequences, lanes=len(sequences), steps=args.batch_steps, target_shift=1, num_workers=args.workers
        )
    else:
        loader = whole_batch_loader(path)
    model = next_value_class()(args.hidden_size)
    start = time.perf_counter()
    if mode == "stream-train":
        trainer.fit(model, datamodule=data)
    elif mode == "stream-eval":
        trainer.validate(model, datamodule=data)
    elif mode == "full-train":
        trainer.fit(model, loader)
    else:
        trainer.validate(model, loader)
    seconds = time.perf_counter() - start
    return {"peak_mib": peak_mib(), "seconds": seconds}


def peak_mib() -> float:
    """The high-water mark of this process's resident memory, in MiB.

    Not ``ru_maxrss``: Linux carries that over from the parent through fork and exec, so a probe started by a large
    driver would report the driver's peak.
    """
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def measure(mode: str, path: Path, args: argparse.Namespace, script: str = __file__) -> dict[str, float]:
    """Run ``script --probe mode path`` in a fresh process and return the JSON its last line prints."""
    command = [sys.executable, script, "--probe", mode, str(path), *args.forward]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(
    rows: list[tuple[str, int, dict[str, float]]],
    path: Path,
    labels: dict[str, str] = MODES,
    title: str = "Peak memory against sequence length",
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'lightning-tbptt[bench]'") from None
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    for mode, label in labels.items():
        points = [(length, result["peak_mib"]) for m, length, result in rows if m == mode]
        if points:
            lengths, peaks = zip(*points, strict=True)
            axes.plot(lengths, peaks, marker="o", label=label)
    axes.set_xscale("log")
    axes.set_xlabel("time steps per lane (T)")
    axes.set_ylabel("peak resident memory (MiB)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[10_000, 50_000, 100_000, 1_000_000])
    parser.add_argument("--full-lengths", type=int, nargs="*", default=[10_000, 50_000])
    parser.add_argument("--lanes", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--segment-length", type=int, default=100)
    parser.add_argument("--batch-steps", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=0, help="LaneDataModule workers of the streamed runs")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot to this PNG file")
    parser.add_argument("--probe", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.forward = [
        f"--hidden-size={args.hidden_size}",
        f"--segment-length={args.segment_length}",
        f"--batch-steps={args.batch_steps}",
        f"--workers={args.workers}",
    ]
    if args.probe:
        mode, path = args.probe
        print(json.dumps(probe(mode, Path(path), args)))
        return

    rows: list[tuple[str, int, dict[str, float]]] = []
    print(f"{'':24}{'T':>10}{'peak MiB':>11}{'seconds':>10}")
    with tempfile.TemporaryDirectory() as directory:
        for length in sorted(set(args.lengths) | set(args.full_lengths)):
            path = Path(directory) / f"waves-{length}.npy"
            write_waves(path, args.lanes, length)
            modes = (["stream-train", "stream-eval"] if length in args.lengths else []) + (
                ["full-train", "full-eval"] if length in args.full_lengths else []
            )
            for mode in modes:
                result = measure(mode, path, args)
                rows.append((mode, length, result))
                print(f"{MODES[mode]:24}{length:>10}{result['peak_mib']:>11.1f}{result['seconds']:>10.2f}", flush=True)
            path.unlink()

    def peak(mode: str, length: int) -> float | None:
        return next((r["peak_mib"] for m, n, r in rows if m == mode and n == length), None)

    shortest, longest = min(args.lengths), max(args.lengths)
    print()
    for mode in ("stream-train", "stream-eval"):
        low, high = peak(mode, shortest), peak(mode, longest)
        if low and high:
            print(f"{MODES[mode]}: peak at T={longest} / at T={shortest} = {high / low:.3f} (target <= 1.10)")
    for length in args.full_lengths:
        full, streamed = peak("full-train", length), peak("stream-train", length)
        if full and streamed:
            print(f"full BPTT / callback training at T={length}: {full / streamed:.1f}x")
        full, streamed = peak("full-eval", length), peak("stream-eval", length)
        if full and streamed:
            print(f"unsplit / segmented evaluation at T={length}: {full / streamed:.1f}x")
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
