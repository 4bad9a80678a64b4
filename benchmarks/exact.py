"""Exact gradients at the memory of one segment: ``exact=True`` against full BPTT and truncated TBPTT.

Every measurement runs in a fresh process on the same task (``--batch-size`` random input sequences of ``T`` steps, an
LSTM and a linear head regressing a running sum of the input, loss summed over segments):

* ``full BPTT``: no callback, one backward through all ``T`` steps (run up to ``--full-max-length``);
* ``exact``: ``TBPTTCallback(segment_length, exact=True)``, the same gradient as full BPTT of the summed segment losses;
* ``truncated``: ``TBPTTCallback(segment_length, step_per="batch")``, the same objective and steps, truncated.

Each process trains ``--batches`` batches (one optimizer step each) and reports the seconds of its last batch (the
first warms up the kernels) and its memory: the peak resident set size above what the process held right before
``fit`` (the model and data made, torch and Lightning loaded), i.e. what training itself added. Prints a table and
the ratios of ``exact`` to full BPTT (memory, time) and to truncated TBPTT (time), length by length.

    python benchmarks/exact.py                                   # T = 4,096, 16,384, 65,536; H = 128 and 512
    python benchmarks/exact.py --lengths 4096 --hidden-sizes 256 --full-max-length 4096
"""

import argparse
import json
import subprocess
import sys
import time
import warnings
from typing import Any

MODES = {"full": "full BPTT", "exact": "exact", "truncated": "truncated"}


def status_mib(key: str) -> float:
    """A memory figure of this process (``VmHWM``: the peak resident set size; ``VmRSS``: now), in MiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def reset_peak() -> None:
    """Make ``VmHWM`` start again from the current resident set size (Linux: write 5 to ``clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def probe(mode: str, args: argparse.Namespace) -> dict[str, float]:
    """Train in this process; return the last batch's seconds and the peak memory training added (MiB)."""
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F

    from lightning_tbptt import TBPTTCallback

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    class Regressor(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(args.input_size, args.hidden_size, batch_first=True)
            self.head = torch.nn.Linear(args.hidden_size, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out, _ = self.lstm(x)
            return F.mse_loss(self.head(out), y, reduction="sum") / y.numel()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Timer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, *rest: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, *rest: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    x = torch.randn(args.batches * args.batch_size, args.length, args.input_size)
    y = torch.cumsum(x[..., :1], dim=1) / args.length**0.5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size)
    timer = Timer()
    callbacks: list[Any] = [timer]
    if mode == "exact":
        callbacks.append(TBPTTCallback(args.segment_length, exact=True))
    elif mode == "truncated":
        callbacks.append(TBPTTCallback(args.segment_length, step_per="batch"))
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
    )
    model = Regressor()
    before = status_mib("VmRSS")
    reset_peak()
    trainer.fit(model, loader)
    return {"seconds": timer.seconds[-1], "added_mib": status_mib("VmHWM") - before, "steps": trainer.global_step}


def measure(mode: str, length: int, hidden_size: int, args: argparse.Namespace) -> dict[str, float]:
    """Run ``--probe mode`` in a fresh process and return the JSON its last line prints."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        mode,
        f"--length={length}",
        f"--hidden-size={hidden_size}",
        f"--input-size={args.input_size}",
        f"--batch-size={args.batch_size}",
        f"--segment-length={args.segment_length}",
        f"--batches={args.batches}",
        f"--threads={args.threads}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--full-max-length", type=int, default=16384, help="longest T run with full BPTT")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--segment-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=2, help="batches per process; the last one is timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hidden-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args)))
        return
    print(
        f"B={args.batch_size}, input {args.input_size}, segments of {args.segment_length} steps,"
        f" {args.threads} torch thread(s), {args.batches} batches per process (the last timed)"
    )
    print(f"{'H':>4} {'T':>7} {'mode':<10} {'s/batch':>8} {'MiB added':>10}")
    ratios: list[str] = []
    for hidden_size in args.hidden_sizes:
        for length in args.lengths:
            results: dict[str, dict[str, float]] = {}
            for mode, label in MODES.items():
                if mode == "full" and length > args.full_max_length:
                    continue
                results[mode] = measure(mode, length, hidden_size, args)
                row = results[mode]
                print(f"{hidden_size:>4} {length:>7} {label:<10} {row['seconds']:>8.3f} {row['added_mib']:>10.1f}")
            exact, truncated = results["exact"], results["truncated"]
            line = f"H={hidden_size} T={length}: exact / truncated time {exact['seconds'] / truncated['seconds']:.2f}x"
            if "full" in results:
                full = results["full"]
                line += (
                    f"; exact / full BPTT memory {exact['added_mib'] / full['added_mib']:.3f}"
                    f" ({full['added_mib'] / max(exact['added_mib'], 1e-9):.1f}x less), time"
                    f" {exact['seconds'] / full['seconds']:.2f}x"
                )
            ratios.append(line)
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
