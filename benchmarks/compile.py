"""What ``torch.compile`` costs and saves with TBPTTCallback: compilations, and time per segment, in one process.

A custom recurrent module (an Elman RNN written with ``nn.Linear``, which ``torch.compile`` traces; ``nn.LSTM`` it runs
eagerly) is trained with ``TBPTTCallback`` three ways: uncompiled, the whole ``LightningModule`` compiled
(``trainer.fit(torch.compile(model))``) and only the recurrent module compiled (``self.rnn = torch.compile(...)``).
Each way runs on batches whose length the segment length divides, and on batches with a ragged last segment.
Prints the compilations (graphs ``torch.compile`` made), the seconds of the first batch (which pays for them) and the
median milliseconds per segment afterwards, with the ratio to the uncompiled run.

    python benchmarks/compile.py                        # H=128, B=16, k=32, T=256 and T=272 (last segment 16)
    python benchmarks/compile.py --dynamic              # torch.compile(..., dynamic=True): no recompilation
"""

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback


class Elman(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Linear(hidden_size, hidden_size, bias=False)
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            state = x.new_zeros(x.shape[0], self.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            state = torch.tanh(self.input(x[:, t]) + self.recurrent(state))
            outputs.append(state)
        return torch.stack(outputs, dim=1), state


class Model(pl.LightningModule):
    def __init__(self, rnn: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden_size, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return F.mse_loss(self.head(out), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class BatchTimer(Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())


def run(way: str, batches: list[Any], args: argparse.Namespace) -> tuple[int, float, float]:
    """Compilations, seconds of the first batch, median seconds of the later ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    rnn: nn.Module = Elman(args.input_size, args.hidden_size)
    if way == "recurrent module compiled":
        rnn = torch.compile(rnn, dynamic=args.dynamic or None)
    model: Any = Model(rnn, args.hidden_size)
    if way == "whole module compiled":
        model = torch.compile(model, dynamic=args.dynamic or None)
    timer = BatchTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[TBPTTCallback(args.segment_length, recurrent_modules=["rnn"]), timer],
    )
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer.fit(model, DataLoader(batches, batch_size=None))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    durations = [end - start for start, end in zip(timer.stamps, timer.stamps[1:], strict=False)]
    return graphs, durations[0], statistics.median(durations[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--input-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--segment-length", type=int, default=32)
    parser.add_argument("--length", type=int, default=256, help="T of the batches the segment length divides")
    parser.add_argument("--ragged", type=int, default=16, help="steps of the ragged last segment of the other batches")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(..., dynamic=True)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    print(
        f"Elman RNN H={args.hidden_size}, B={args.batch_size}, k={args.segment_length}, {args.batches} batches,"
        f" {args.threads} threads, torch {torch.__version__}, pytorch-lightning {pl.__version__},"
        f" dynamic={args.dynamic}"
    )
    print(f"{'batches':<22}{'way':<28}{'graphs':>8}{'1st batch s':>13}{'ms/segment':>12}{'vs eager':>10}")
    for length in (args.length, args.length + args.ragged):
        generator = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(args.batches):
            x = torch.randn(args.batch_size, length, args.input_size, generator=generator)
            batches.append((x, torch.cumsum(x[..., :1], dim=1) / length**0.5))
        segments = -(-length // args.segment_length)
        label = f"T={length} ({'ragged' if length % args.segment_length else 'even'})"
        eager_ms = None
        for way in ("uncompiled", "whole module compiled", "recurrent module compiled"):
            graphs, first, later = run(way, batches, args)
            ms = 1000 * later / segments
            eager_ms = ms if eager_ms is None else eager_ms
            print(f"{label:<22}{way:<28}{graphs:>8}{first:>13.2f}{ms:>12.2f}{ms / eager_ms:>10.3f}")


if __name__ == "__main__":
    main()
