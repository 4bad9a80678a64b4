"""The truncation-bias probe and segment_length="auto" on a task whose dependency length is known: copy at lag L.

Each sequence is random symbols out of ``V``; the target at step ``t`` is the symbol seen at step ``t - L`` (steps
before ``L`` are not scored). To learn it, a gradient must travel ``L`` steps back through the LSTM's state: segments
shorter than ``L`` cut every such path, and the model stays at chance (``1/V``).

The script trains the same LSTM twice from the same initial weights on the same batches:

* ``TBPTTCallback("auto", probe_every=..., min_segment_length=2, max_segment_length=4L)``: the probe measures, every
  ``probe_every`` batches, the relative bias of the truncated gradient at several segment lengths, and ``"auto"``
  moves the segment length towards the shortest whose bias is at most the tolerance, at most a factor 2 per probe;
* a fixed segment length below the lag (``L/2``), for comparison.

It prints every probe (read from ``callback.probe_result`` after each batch, and the ``tbptt/...`` rows the probe
logs, read back from a ``CSVLogger``'s ``metrics.csv``), the lengths ``"auto"`` chose and the held-out accuracy of
both runs. It checks what the documentation guarantees and exits non-zero where that fails:

* every change of length follows the documented rule (towards the probe's suggestion, at most doubling or halving,
  within the grid, never beyond the shortest grid length that holds the whole batch);
* ``global_step`` is the sum over batches of the segments at each batch's own length (one step per segment);
* the logged rows are the values of ``probe_result``.

Whether the chosen length ends up covering the lag is printed, not asserted: the documentation promises a length
whose measured bias is within the tolerance (or the longest allowed), not a length above the lag.

    python examples/truncation_probe.py            # the default run: about two minutes on 2 CPU cores
    python examples/truncation_probe.py --help     # the flags and their defaults
"""

import argparse
import csv
import math
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback

# the small setting the test suite runs the script with (tests/test_examples.py): a few seconds on one core
CI_ARGV = ["--batches", "40", "--probe-every", "20", "--length", "32", "--hidden-size", "16", "--eval-size", "64"]

IGNORE = -100  # the target of a step that is not scored


class Copier(pl.LightningModule):
    """An LSTM and a linear head predicting the symbol seen ``lag`` steps earlier; it knows nothing about TBPTT."""

    def __init__(self, vocab: int, hidden_size: int, lr: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(vocab, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # the sum over the scored steps of the segment, divided by their number (at least 1): a segment with no
        # scored step (all of it before step L) has loss 0, where a mean would give 0 / 0
        targets = batch["y"]
        loss = F.cross_entropy(self(batch["x"]).transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        return loss / (targets != IGNORE).sum().clamp(min=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def copy_task(count: int, length: int, vocab: int, lag: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` sequences of ``length`` one-hot symbols; the target at step ``t`` is the symbol of step ``t - lag``."""
    symbols = torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))
    targets = torch.full_like(symbols, IGNORE)
    targets[:, lag:] = symbols[:, :-lag]
    return {"x": F.one_hot(symbols, vocab).float(), "y": targets}


def accuracy(model: Copier, data: dict[str, torch.Tensor]) -> float:
    """The share of scored steps predicted right, by a plain forward over whole sequences (no callback)."""
    with torch.no_grad():
        predicted = model(data["x"]).argmax(-1)
    scored = data["y"] != IGNORE
    return (predicted[scored] == data["y"][scored]).float().mean().item()


class Lengths(pl.Callback):
    """The segment length each training batch trained with, and each new probe result."""

    def __init__(self, tbptt: TBPTTCallback) -> None:
        self.tbptt = tbptt
        self.lengths: list[int] = []
        self.probes: list = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.lengths.append(self.tbptt.current_segment_length)
        result = self.tbptt.probe_result  # the last probe; a new object after each probe
        if result is not None and (not self.probes or self.probes[-1] is not result):
            self.probes.append(result)


def expected_next(current: int, suggested: int | None, low: int, high: int, batch_length: int) -> int:
    """The documented rule of ``"auto"`` (docs/choosing_segment_length.md), written out independently."""
    longest = low  # the shortest grid length that holds the whole batch, at most `high`
    while longest < batch_length and 2 * longest <= high:
        longest *= 2
    target = longest if suggested is None else min(suggested, longest)  # nothing within tolerance: longer
    current = min(current, longest)
    if target > current:
        return min(2 * current, longest)  # doubling at most
    if target < current:
        return max(current // 2, target, low)  # halving at most
    return current


def fit(model: Copier, tbptt: TBPTTCallback, batches: list, logger: object = False) -> tuple[pl.Trainer, Lengths]:
    lengths = Lengths(tbptt)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[tbptt, lengths],
        gradient_clip_val=1.0,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer, lengths


def check(condition: bool, claim: str) -> None:
    """Exit with status 1, saying which claim failed, unless ``condition`` holds (unlike ``assert``, also under -O)."""
    if not condition:
        raise SystemExit(f"FAILED: {claim}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--lag", type=int, default=8, help="the lag L of the copy task")
    parser.add_argument("--length", type=int, default=64, help="time steps per batch")
    parser.add_argument("--vocab", type=int, default=8, help="symbols V")
    parser.add_argument("--hidden-size", type=int, default=64, help="LSTM units")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=600, help="training batches (each of fresh sequences)")
    parser.add_argument("--probe-every", type=int, default=50, help="probe the first batch and every N-th")
    parser.add_argument("--tolerance", type=float, default=0.1, help="the bias a segment length may have")
    parser.add_argument("--min-length", type=int, default=2, help="the shortest segment length of the grid")
    parser.add_argument("--max-length", type=int, default=None, help="the longest of the grid (None: 4 * lag)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--eval-size", type=int, default=512, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    high = args.max_length or 4 * args.lag
    started = time.perf_counter()

    data = copy_task(args.batches * args.batch_size, args.length, args.vocab, args.lag, args.seed)
    batches = [
        {key: value[i : i + args.batch_size] for key, value in data.items()}
        for i in range(0, len(data["x"]), args.batch_size)
    ]
    held_out = copy_task(args.eval_size, args.length, args.vocab, args.lag, args.seed + 1)
    torch.manual_seed(args.seed)
    initial = Copier(args.vocab, args.hidden_size, args.lr).state_dict()
    print(
        f"copy task: lag L={args.lag}, {args.length} steps per batch, V={args.vocab} (chance {1 / args.vocab:.3f});"
        f" LSTM H={args.hidden_size}, {args.batches} batches of {args.batch_size}"
    )

    # 1. "auto": the probe every `probe_every` batches, the segment length chosen from what it measures
    tbptt = TBPTTCallback(
        segment_length="auto",
        probe_every=args.probe_every,
        probe_tolerance=args.tolerance,
        min_segment_length=args.min_length,
        max_segment_length=high,
    )
    model = Copier(args.vocab, args.hidden_size, args.lr)
    model.load_state_dict(initial)
    auto_started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        logger = pl.loggers.CSVLogger(folder, name="probe")
        trainer, seen = fit(model, tbptt, batches, logger)
        with open(Path(logger.log_dir) / "metrics.csv") as file:  # what the probe logged, one row per probe
            rows = [row for row in csv.DictReader(file) if row.get("tbptt/probe_seconds")]
    auto_seconds = time.perf_counter() - auto_started
    auto_accuracy = accuracy(model, held_out)

    lengths = sorted({length for probe in seen.probes for length in probe.biases})
    print(
        f"\nprobes of TBPTTCallback('auto', probe_every={args.probe_every}, min_segment_length={args.min_length},"
        f" max_segment_length={high}), tolerance {args.tolerance}: relative bias of the truncated gradient at k"
    )
    print(
        f"  {'batch':>5} {'step':>6}  {'in use':>6}  "
        + "".join(f"{'k=' + str(k):>7}" for k in lengths)
        + f"  {'suggested':>9}  {'next':>4}  {'decay/step':>10}"
    )
    for probe in seen.probes:
        biases = "".join(f"{probe.biases[k]:>7.3f}" if k in probe.biases else f"{'':>7}" for k in lengths)
        rate = f"{probe.decay_rate:.3f}" if probe.decay_rate is not None else "-"
        print(
            f"  {probe.batch:>5} {probe.global_step:>6}  {probe.segment_length:>6}  {biases}"
            f"  {probe.suggested or 'none':>9}  {probe.next_length:>4}  {rate:>10}"
        )
    chosen = [probe.next_length for probe in seen.probes]
    logged = sorted(key for row in rows for key, value in row.items() if key.startswith("tbptt/") and value)
    print(f"logged by the probe (metrics.csv): {len(rows)} rows of {sorted(set(logged))}")
    final = tbptt.current_segment_length
    print(
        f"segment lengths chosen, probe by probe: {chosen}; final {final}"
        f" ({'longer than' if final > args.lag else 'NOT longer than'} the lag {args.lag}: a segment must hold a"
        " symbol and its target)"
    )

    # 2. for comparison: a fixed segment length below the lag
    short = max(1, args.lag // 2)
    model_short = Copier(args.vocab, args.hidden_size, args.lr)
    model_short.load_state_dict(initial)
    short_started = time.perf_counter()
    trainer_short, _ = fit(model_short, TBPTTCallback(segment_length=short), batches)
    short_seconds = time.perf_counter() - short_started
    short_accuracy = accuracy(model_short, held_out)

    print(f"\n  {'configuration':<44} {'optimizer steps':>15} {'seconds':>8} {'held-out accuracy':>18}")
    for name, steps, seconds, score in [
        (f"TBPTTCallback({short}) (L/2)", trainer_short.global_step, short_seconds, short_accuracy),
        (f"TBPTTCallback('auto', ...), final length {final}", trainer.global_step, auto_seconds, auto_accuracy),
    ]:
        print(f"  {name:<44} {steps:>15} {seconds:>8.1f} {score:>18.3f}")
    print(f"time: {time.perf_counter() - started:.0f} s")

    # 3. what the documentation guarantees
    current = high  # "auto" starts at the longest grid length
    for probe in seen.probes:
        check(probe.segment_length == current, f"batch {probe.batch} was probed at the length in use, {current}")
        expected = expected_next(probe.segment_length, probe.suggested, args.min_length, high, args.length)
        check(probe.next_length == expected, f"batch {probe.batch}: the rule's {expected}, not {probe.next_length}")
        current = probe.next_length
    check(len(seen.probes) == math.ceil(args.batches / args.probe_every), "the first and every N-th batch probed")
    segments = sum(math.ceil(args.length / length) for length in seen.lengths)
    check(trainer.global_step == segments, f"one step per segment (global_step {trainer.global_step}, {segments})")
    check(len(rows) == len(seen.probes), f"one logged row per probe ({len(rows)} rows, {len(seen.probes)} probes)")
    for row, probe in zip(rows, seen.probes, strict=True):
        check(float(row["tbptt/segment_length"]) == probe.next_length, f"logged length of batch {probe.batch}")
        if probe.bias is not None:
            same = math.isclose(float(row["tbptt/probe_bias"]), probe.bias, rel_tol=1e-6)
            check(same, f"logged bias of batch {probe.batch}")


if __name__ == "__main__":
    main()
