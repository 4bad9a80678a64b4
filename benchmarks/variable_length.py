"""Time of TBPTTCallback on padded variable-length batches: does the cost follow the number of valid time steps?

Batches of ``B`` sequences whose lengths are uniform in ``[T/10, T]``, padded to ``T``. The same LSTM is trained four
ways, in interleaved rounds, in one process:

* every padded step (no ``lengths``: the baseline a user without this library pays);
* ``lengths=...``: segments in which every sequence has ended are skipped;
* ``lengths=..., drop_finished=True``: finished rows are dropped from later segments as well;
* the same with a model that packs every segment with ``pack_padded_sequence`` (the packed path, for comparison).

Prints seconds per batch, valid time steps per second, and ``(time / baseline time) / (valid steps / padded steps)``,
which is 1.0 when the cost is exactly proportional to the valid steps.

    python benchmarks/variable_length.py
"""

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from lightning_tbptt import TBPTTCallback, masked_mean

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import fit_seconds


class Regressor(pl.LightningModule):
    def __init__(self, input_size: int, hidden_size: int, packed: bool = False) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)
        self.packed = packed

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch["x"]
        if self.packed:
            packed = pack_padded_sequence(x, batch["lengths"].cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])
        else:
            out, _ = self.lstm(x)
        return masked_mean((self.head(out) - batch["y"]) ** 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make_batches(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.batches):
        lengths = torch.randint(args.length // 10, args.length + 1, (args.batch_size,), generator=generator)
        x = torch.randn(args.batch_size, args.length, args.input_size, generator=generator)
        batches.append({"x": x, "y": torch.cumsum(x[..., :1], dim=1) / args.length**0.5, "lengths": lengths})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=4096, help="padded length T")
    parser.add_argument("--segment-length", type=int, default=64)
    parser.add_argument("--batches", type=int, default=3, help="batches per run, the first one untimed")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median batch is reported")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = make_batches(args)
    timed = batches[1:]
    valid_fraction = sum(int(b["lengths"].sum()) for b in timed) / (len(timed) * args.batch_size * args.length)
    valid_per_batch = valid_fraction * args.batch_size * args.length
    initial = Regressor(args.input_size, args.hidden_size).state_dict()
    k = args.segment_length
    methods = {
        "every padded step": (False, lambda: TBPTTCallback(k)),
        "lengths (skip ended)": (False, lambda: TBPTTCallback(k, lengths="lengths")),
        "lengths + drop_finished": (False, lambda: TBPTTCallback(k, lengths="lengths", drop_finished=True)),
        "packed + drop_finished": (True, lambda: TBPTTCallback(k, lengths="lengths", drop_finished=True)),
    }
    runs: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            packed, callback = methods[name]
            model = Regressor(args.input_size, args.hidden_size, packed=packed)
            model.load_state_dict(initial)
            runs[name] += fit_seconds(model, batches, [callback()])

    seconds = {name: statistics.median(times) for name, times in runs.items()}
    baseline = seconds["every padded step"]
    print(
        f"LSTM H={args.hidden_size}, B={args.batch_size}, T={args.length}, k={k}, lengths uniform in"
        f" [{args.length // 10}, {args.length}] (valid fraction {valid_fraction:.3f}): median of"
        f" {len(runs['every padded step'])} timed batches, {args.rounds} interleaved rounds, {args.threads} threads,"
        f" torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    print(f"{'method':<26}{'s/batch':>9}{'valid steps/s':>15}{'vs padded':>11}{'time/valid':>12}")
    for name, s in seconds.items():
        ratio = s / baseline
        print(f"{name:<26}{s:>9.2f}{valid_per_batch / s:>15.0f}{ratio:>11.3f}{ratio / valid_fraction:>12.3f}")


if __name__ == "__main__":
    main()
