"""A lag truncation cannot learn: the copy task with lag ``L``, truncated TBPTT against ``exact=True`` and full BPTT.

Each sequence is ``T`` random symbols out of ``V`` (one-hot inputs); the target at step ``t`` is the input symbol at
step ``t - L``, and steps ``t < L`` are not scored (target ``-100``, ignored by ``F.cross_entropy``). A one-layer LSTM
and a linear head, a plain ``LightningModule`` whose ``training_step`` takes the mean cross-entropy over the scored
steps of whatever batch (or segment) it is given, is trained from the same initialisation, on the same batches in the
same order, with Adam and ``gradient_clip_val=1.0``, in these configurations:

* ``TBPTT k=...``: ``TBPTTCallback(segment_length=k)`` with ``k = L/4, L/2, 2L``, one optimizer step per segment. A
  target whose source lies in an earlier segment gets no gradient through the state that carries it, so ``k < L``
  cannot learn the task; with ``k = 2L`` only the targets in the last ``k - L`` steps of a segment can;
* ``TBPTT k=L``: ``TBPTTCallback(segment_length=L)``: the cuts fall every ``L`` steps, so the source of every target
  lies in the segment before it: the task is not learned however long the training;
* ``random k~L (AWD)`` and ``random k~L/2 (AWD)``: ``TBPTTCallback(segment_length=k,
  random_lengths=RandomLengths())``, AWD-LSTM's lengths around ``k`` (standard deviation 5, at least 5): the cuts move
  from batch to batch, and segments longer than ``L`` give the targets after their first ``L`` steps a gradient;
* ``random first cut k=L``: ``RandomLengths("offset")``: segments of ``L`` steps after a first one of random length;
  every cut still lies ``L`` steps before the next;
* ``windows 2L/L/2``: ``TBPTTCallback(segment_length=2L, stride=L//2)``, windows of ``2L`` steps every ``L/2`` steps,
  one optimizer step per window; the loss is on each window's new steps (the model marks the window's overlap as not
  scored, from :func:`~lightning_tbptt.current_segment`), each backpropagated through at least ``1.5 L`` steps;
* ``exact k=L/4``: ``TBPTTCallback(segment_length=L//4, exact=True)``, one optimizer step per batch with the exact
  gradient of the summed segment losses through the whole batch;
* ``full BPTT``: no callback, one backward through the whole sequence per batch.

All configurations run one after another in this process, one torch thread. The accuracy is measured after training
on fresh held-out sequences with a plain forward pass over the whole sequences (no callback), on the scored steps;
chance is ``1/V``. Prints one row per configuration: optimizer steps (``trainer.global_step``), seconds of
``trainer.fit`` and the held-out accuracy.

    python benchmarks/lag.py
    python benchmarks/lag.py --lag 4 --length 16 --hidden-size 8 --batches 2 --epochs 1 --eval-size 8   # smoke test
"""

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tbptt import RandomLengths, TBPTTCallback, current_segment

IGNORE = -100  # the target of an unscored step


class Copier(pl.LightningModule):
    """An LSTM and a linear head predicting, at every step, the symbol seen ``lag`` steps earlier.

    It knows nothing about TBPTT: its loss is the mean cross-entropy over the scored steps of the batch it is given.
    """

    def __init__(self, vocab: int, hidden_size: int, lr: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(vocab, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        logits: torch.Tensor = self.head(out)
        return logits

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The targets the loss scores (``IGNORE`` on the others)."""
        return batch["y"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        targets = self.targets(batch)
        # summed and divided by the scored steps (at least 1): a segment with no scored step (all of it before step
        # L) has loss 0 and a zero gradient, where the mean reduction would give 0 / 0 = NaN
        loss = F.cross_entropy(self(batch["x"]).transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
        return loss / (targets != IGNORE).sum().clamp(min=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NewStepsCopier(Copier):
    """The same model, scoring only the new steps of an overlapping window (Williams and Peng's BPTT(h; h')).

    A plain ``F.cross_entropy`` would score every step of the window, the overlap with the previous window included;
    the window's loss mask (``current_segment().loss_mask``) marks the new steps.
    """

    def targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        segment = current_segment()
        return batch["y"].masked_fill(~segment.laid_out(segment.loss_mask), IGNORE)


def make_sequences(count: int, args: argparse.Namespace, seed: int) -> dict[str, torch.Tensor]:
    """``count`` sequences of ``T`` random symbols: one-hot inputs ``x`` and the lagged targets ``y``."""
    symbols = torch.randint(0, args.vocab, (count, args.length), generator=torch.Generator().manual_seed(seed))
    targets = torch.full_like(symbols, IGNORE)
    targets[:, args.lag :] = symbols[:, : -args.lag]
    return {"x": F.one_hot(symbols, args.vocab).float(), "y": targets}


def batches(data: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The training batches, in a fixed order (the same for every configuration)."""
    rows = data["x"].shape[0]
    return [{key: value[i : i + batch_size] for key, value in data.items()} for i in range(0, rows, batch_size)]


@torch.no_grad()
def accuracy(model: Copier, data: dict[str, torch.Tensor]) -> float:
    """The accuracy on the scored steps of ``data``, with one plain forward pass over the whole sequences."""
    model.eval()
    scored = data["y"] != IGNORE
    correct = (model(data["x"]).argmax(-1) == data["y"]) & scored
    return float(correct.sum() / scored.sum())


def configurations(lag: int) -> dict[str, tuple[type[Copier], Callable[[], list[Any]]]]:
    """Name -> (model class, callbacks) of every configuration."""
    short, half, window = max(lag // 4, 1), max(lag // 2, 1), 2 * lag
    return {
        f"TBPTT k={short} (L/4)": (Copier, lambda: [TBPTTCallback(short)]),
        f"TBPTT k={half} (L/2)": (Copier, lambda: [TBPTTCallback(half)]),
        f"TBPTT k={lag} (L)": (Copier, lambda: [TBPTTCallback(lag)]),
        f"random k~{lag} (L, AWD)": (Copier, lambda: [TBPTTCallback(lag, random_lengths=RandomLengths())]),
        f"random k~{half} (L/2, AWD)": (Copier, lambda: [TBPTTCallback(half, random_lengths=RandomLengths())]),
        f"random first cut k={lag} (L)": (Copier, lambda: [TBPTTCallback(lag, random_lengths=RandomLengths("offset"))]),
        f"TBPTT k={window} (2L)": (Copier, lambda: [TBPTTCallback(window)]),
        f"windows {window}/{half} (2L/L/2)": (NewStepsCopier, lambda: [TBPTTCallback(window, stride=half)]),
        f"exact k={short} (L/4)": (Copier, lambda: [TBPTTCallback(short, exact=True)]),
        "full BPTT": (Copier, lambda: []),
    }


def train(
    model: Copier, loader: list[dict[str, torch.Tensor]], callbacks: list[Any], args: argparse.Namespace
) -> tuple[int, float]:
    """Fit ``model``; return its optimizer steps and the seconds of ``trainer.fit``."""
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        gradient_clip_val=args.clip,
        callbacks=callbacks,
    )
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    trainer.fit(model, torch.utils.data.DataLoader(loader, batch_size=None))
    return trainer.global_step, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lag", type=int, default=8, help="the lag L")
    parser.add_argument("--length", type=int, default=64, help="time steps T per sequence")
    parser.add_argument("--vocab", type=int, default=8, help="symbols V")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=100, help="training batches per epoch")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam's learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val")
    parser.add_argument("--eval-size", type=int, default=1024, help="held-out sequences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="+", default=None, help="run only the configurations starting so")
    args = parser.parse_args()
    if not 0 < args.lag < args.length:
        parser.error("--lag must be between 1 and --length - 1")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    loader = batches(make_sequences(args.batches * args.batch_size, args, args.seed), args.batch_size)
    held_out = make_sequences(args.eval_size, args, args.seed + 1)
    torch.manual_seed(args.seed)
    initial = Copier(args.vocab, args.hidden_size, args.lr).state_dict()

    print(
        f"copy task: L={args.lag}, T={args.length}, V={args.vocab}; LSTM H={args.hidden_size}, B={args.batch_size},"
        f" {args.batches} batches x {args.epochs} epochs, Adam lr={args.lr}, gradient_clip_val={args.clip},"
        f" {args.threads} torch thread(s), torch {torch.__version__}, pytorch-lightning {pl.__version__}"
    )
    print(f"{'configuration':<30}{'opt steps':>10}{'seconds':>9}{'accuracy':>10}", flush=True)
    for name, (model_class, callbacks) in configurations(args.lag).items():
        if args.only and not any(name.startswith(prefix) for prefix in args.only):
            continue
        model = model_class(args.vocab, args.hidden_size, args.lr)
        model.load_state_dict(initial)
        steps, seconds = train(model, loader, callbacks(), args)
        print(f"{name:<30}{steps:>10}{seconds:>9.1f}{accuracy(model, held_out):>10.3f}", flush=True)
    chance = 1 / args.vocab
    print(f"held-out accuracy on the scored steps of {args.eval_size} fresh sequences; chance is 1/V = {chance:.3f}")


if __name__ == "__main__":
    main()
