"""Time per segment of TBPTTCallback against the Lightning docs' manual-optimization loop and a raw PyTorch loop.

The same LSTM is trained on the same batches three ways, in one process, in interleaved rounds. A batch is timed from
its start to the start of the next one (so per-batch loop overhead counts); the first batch of every run is a warm-up.
Prints the median milliseconds per segment and the ratios.

    python benchmarks/overhead.py                 # H=256, B=32, k=64, T=2048, 1 layer, SGD
    python benchmarks/overhead.py --log           # one self.log per segment in both Lightning variants, an in-memory
                                                  # logger and log_every_n_steps=1 (a logger row per optimizer step)
    python benchmarks/overhead.py --log --log-every batch   # ... with TBPTTCallback(log_every="batch"): a row per batch
    python benchmarks/overhead.py --log --log-every both    # both callback variants, interleaved in the same rounds
    python benchmarks/overhead.py --progress-bar  # with Lightning's TQDM bar (segment i/k) in both Lightning variants
    python benchmarks/overhead.py --stride 32     # TBPTTCallback with overlapping windows (k2=64 every k1=32 steps)
    python benchmarks/overhead.py --tiny          # where Python dominates: H=8, input 2, B=4, k=8, T=256, 8 batches
    python benchmarks/overhead.py --compare-paths # a fourth method: TBPTTCallback with the library's fast paths off
"""

import argparse
import itertools
import logging
import statistics
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback, _lightning_internals
from lightning_tbptt.state import detach_state


class Net(nn.Module):
    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)


class PlainModel(pl.LightningModule):
    """What a user writes for short sequences; TBPTTCallback does the rest."""

    def __init__(self, net: Net, lr: float, log: bool) -> None:
        super().__init__()
        self.net, self.lr, self.do_log = net, lr, log

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, _ = self.net.lstm(x)
        loss = F.mse_loss(self.net.head(out), y)
        if self.do_log:
            self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ManualModel(PlainModel):
    """The Lightning 2.x docs' recipe: manual optimization and a loop over segments inside training_step."""

    def __init__(self, net: Net, lr: float, log: bool, segment_length: int) -> None:
        super().__init__(net, lr, log)
        self.automatic_optimization = False
        self.segment_length = segment_length

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizer = self.optimizers()
        x, y = batch
        hiddens = None
        for x_seg, y_seg in zip(x.split(self.segment_length, 1), y.split(self.segment_length, 1), strict=True):
            out, hiddens = self.net.lstm(x_seg, hiddens)
            loss = F.mse_loss(self.net.head(out), y_seg)
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            hiddens = detach_state(hiddens)
            if self.do_log:
                self.log("loss", loss)


class MemoryLogger(Logger):
    """Keeps the rows in a list: what logging costs the loop, without a file system."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, metrics))


class BatchTimer(Callback):
    """Records the time at the start of every batch and at the end of the last one."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())


def batch_seconds(stamps: list[float]) -> list[float]:
    """Durations of every batch but the first (a warm-up), from the start of one batch to the start of the next."""
    return [end - start for start, end in itertools.pairwise(stamps[1:])]


def fit_seconds(
    model: pl.LightningModule,
    batches: list[Any],
    callbacks: list[Callback],
    progress_bar: bool = False,
    log: bool = False,
) -> list[float]:
    timer = BatchTimer()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=MemoryLogger() if log else False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[*callbacks, timer],
    )
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return batch_seconds(timer.stamps)


def raw_seconds(net: Net, batches: list[Any], segment_length: int, lr: float) -> list[float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    stamps = []
    for x, y in batches:
        stamps.append(time.perf_counter())
        hiddens = None
        for x_seg, y_seg in zip(x.split(segment_length, 1), y.split(segment_length, 1), strict=True):
            out, hiddens = net.lstm(x_seg, hiddens)
            loss = F.mse_loss(net.head(out), y_seg)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            hiddens = detach_state(hiddens)
    stamps.append(time.perf_counter())
    return batch_seconds(stamps)


BY_BATCH = "TBPTTCallback, per batch"
LIGHTNING_PATHS = "TBPTTCallback, no fast paths"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--segment-length", type=int, default=64)
    parser.add_argument("--length", type=int, default=2048, help="time steps per batch (T)")
    parser.add_argument("--batches", type=int, default=4, help="batches per run, the first one untimed")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median batch is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is the least noisy)")
    parser.add_argument("--log", action="store_true", help="self.log once per segment in the Lightning variants")
    parser.add_argument("--progress-bar", action="store_true", help="Lightning's TQDM bar in the Lightning variants")
    parser.add_argument("--stride", type=int, default=None, help="overlapping windows for TBPTTCallback (k1)")
    parser.add_argument(
        "--log-every",
        choices=["step", "batch", "both"],
        default="step",
        help="TBPTTCallback(log_every=...); both: a fourth method, the callback with 'batch' beside 'step'",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="defaults for a tiny LSTM where per-segment Python dominates: H=8, input 2, B=4, k=8, T=256, 8 batches",
    )
    parser.add_argument(
        "--compare-paths",
        action="store_true",
        help="a fourth method: TBPTTCallback with its fast paths off (every hook through Lightning's dispatch)",
    )
    tiny = argparse.ArgumentParser(add_help=False)
    tiny.add_argument("--tiny", action="store_true")
    if tiny.parse_known_args()[0].tiny:  # new defaults: an option given beside --tiny still wins
        parser.set_defaults(hidden_size=8, input_size=2, batch_size=4, segment_length=8, length=256, batches=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr = 0.01
    batches = []
    for _ in range(args.batches):
        x = torch.randn(args.batch_size, args.length, args.input_size)
        batches.append((x, torch.cumsum(x[..., :1], dim=1) / args.length**0.5))
    segments = -(-args.length // args.segment_length)
    initial = Net(args.input_size, args.hidden_size)

    def fresh() -> Net:
        net = Net(args.input_size, args.hidden_size)
        net.load_state_dict(initial.state_dict())
        return net

    def run(name: str) -> list[float]:
        if name == "raw PyTorch loop":
            return raw_seconds(fresh(), batches, args.segment_length, lr)
        if name == "manual Lightning loop":
            manual = ManualModel(fresh(), lr, args.log, args.segment_length)
            return fit_seconds(manual, batches, [], args.progress_bar, args.log)
        log_every = "batch" if name == BY_BATCH or args.log_every == "batch" else "step"
        callback = TBPTTCallback(args.segment_length, stride=args.stride, log_every=log_every)
        _lightning_internals.FAST_PATHS = name != LIGHTNING_PATHS
        try:
            return fit_seconds(PlainModel(fresh(), lr, args.log), batches, [callback], args.progress_bar, args.log)
        finally:
            _lightning_internals.FAST_PATHS = True

    names = ["raw PyTorch loop", "manual Lightning loop", "TBPTTCallback"] + [BY_BATCH] * (args.log_every == "both")
    names += [LIGHTNING_PATHS] * args.compare_paths
    runs: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        # rotate the order every round so that no method always runs first or last
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            runs[name] += run(name)

    per_segment = {name: 1000 * statistics.median(times) / segments for name, times in runs.items()}
    raw, manual_ms = per_segment["raw PyTorch loop"], per_segment["manual Lightning loop"]
    print(
        f"LSTM H={args.hidden_size}, B={args.batch_size}, k={args.segment_length}, T={args.length}: median of "
        f"{len(runs['TBPTTCallback'])} timed batches of {segments} segments, {args.rounds} interleaved rounds, "
        f"{args.threads} threads, torch {torch.__version__}, "
        f"pytorch-lightning {pl.__version__}, log={args.log}, log_every={args.log_every!r},"
        f" progress bar={args.progress_bar}, stride={args.stride}, compare paths={args.compare_paths}"
        + ("" if args.stride is None else " (TBPTTCallback: ms per batch / segments of the plain split, see docs)")
    )
    print(f"{'method':<28}{'ms/segment':>12}{'min':>9}{'vs raw':>10}{'vs manual':>12}")
    for name, ms in per_segment.items():
        fastest = 1000 * min(runs[name]) / segments
        print(f"{name:<28}{ms:>12.2f}{fastest:>9.2f}{ms / raw:>10.3f}{ms / manual_ms:>12.3f}")
    if BY_BATCH in per_segment:
        step, batch = per_segment["TBPTTCallback"], per_segment[BY_BATCH]
        print(f"log_every='step' against 'batch': {step / batch:.3f}x, {step - batch:+.2f} ms per segment")
    if LIGHTNING_PATHS in per_segment:
        fast, slow = per_segment["TBPTTCallback"], per_segment[LIGHTNING_PATHS]
        print(f"fast paths against Lightning's paths: {fast / slow:.3f}x, {fast - slow:+.3f} ms per segment")


if __name__ == "__main__":
    main()
