"""exact=True: a lag that truncated BPTT cannot learn, learned at the same segment length with exact gradients.

The task is the copy task with a lag: each sequence is ``--length`` random symbols out of ``--vocab`` (one-hot
inputs), and the target at step ``t`` is the symbol seen ``--lag`` steps earlier. A one-layer LSTM must hold each
symbol for ``lag`` steps. With ``TBPTTCallback(segment_length=k)`` and ``k`` shorter than the lag, no gradient ever
crosses the ``lag`` steps between a symbol and the step that needs it (the state is carried, but detached), so the
model stays at chance however long it trains. ``TBPTTCallback(segment_length=k, exact=True)`` keeps the same segments
and the memory of one of them, but recomputes them in reverse order to give each batch's one optimizer step the
untruncated gradient: the lag is learned. A third run, full BPTT without the callback, is the reference.

The script prints the held-out accuracy of each and checks that ``exact=True`` beats truncation; then, in float64 on
a tiny model, that two ``exact=True`` steps give the same parameters as a plain PyTorch loop that backpropagates the
same loss through the whole sequence (``torch.allclose``).

    python examples/exact_gradients.py                     # lag 8, segments of 4: about 2.5 minutes on 2 CPU cores
    python examples/exact_gradients.py --segment-length 2  # segments of L/4 (exact=True slower: 32 per batch)
"""

import argparse
import copy
import logging
import sys
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback

# The small setting CI runs this script with (a few seconds on one core).
CI_ARGV = ["--lag=4", "--length=16", "--vocab=4", "--hidden-size=24", "--batches=16", "--epochs=8", "--lr=0.02"]

IGNORE = -100  # the target of a step with nothing to copy yet (t < lag)


class Copier(pl.LightningModule):
    """An LSTM and a linear head predicting, at every step, the symbol seen ``lag`` steps earlier.

    Nothing about TBPTT in it: the loss is the mean cross-entropy over the scored steps of whatever it is given.
    """

    def __init__(self, vocab: int, hidden_size: int, lr: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(vocab, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return segment_loss(self(batch["x"]), batch["y"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def segment_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the scored steps; 0 (and a zero gradient) for a segment with none scored."""
    summed = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
    return summed / (targets != IGNORE).sum().clamp(min=1)


def make_batches(count: int, batch_size: int, args: argparse.Namespace, seed: int) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch_size`` sequences: one-hot symbols ``x`` and their lagged copies ``y``."""
    generator = torch.Generator().manual_seed(seed)
    symbols = torch.randint(0, args.vocab, (count * batch_size, args.length), generator=generator)
    targets = torch.full_like(symbols, IGNORE)
    targets[:, args.lag :] = symbols[:, : -args.lag]
    x = F.one_hot(symbols, args.vocab).to(torch.get_default_dtype())
    return [{"x": x[i : i + batch_size], "y": targets[i : i + batch_size]} for i in range(0, len(x), batch_size)]


@torch.no_grad()
def accuracy(model: Copier, batch: dict[str, torch.Tensor]) -> float:
    """Accuracy on the scored steps, one plain forward pass over the whole sequences (no callback)."""
    scored = batch["y"] != IGNORE
    return float(((model(batch["x"]).argmax(-1) == batch["y"]) & scored).sum() / scored.sum())


def fit(model: Copier, batches: list[dict[str, torch.Tensor]], callbacks: list, epochs: int, clip: float | None) -> int:
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        gradient_clip_val=clip,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # batch_size=None: the list already holds whole batches, taken in the same order by every run
    trainer.fit(model, DataLoader(batches, batch_size=None))
    return trainer.global_step


@torch.no_grad()
def difference(a: nn.Module, b: nn.Module) -> tuple[bool, float]:
    """Whether the parameters of ``a`` and ``b`` are ``torch.allclose``, and their largest difference."""
    pairs = list(zip(a.parameters(), b.parameters(), strict=True))
    return all(torch.allclose(x, y) for x, y in pairs), max(float((x - y).abs().max()) for x, y in pairs)


def exact_equals_full_bptt(args: argparse.Namespace) -> None:
    """Two ``exact=True`` steps against a hand-written loop backpropagating through whole sequences, in float64."""
    torch.set_default_dtype(torch.float64)
    small = argparse.Namespace(vocab=4, lag=3, length=12)
    batches = make_batches(2, 4, small, seed=123)
    torch.manual_seed(args.seed)
    model = Copier(small.vocab, 8, lr=0.05)
    reference = copy.deepcopy(model)
    segment_length = 2

    fit(model, batches, [TBPTTCallback(segment_length=segment_length, exact=True)], epochs=1, clip=None)

    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    for batch in batches:
        logits = reference(batch["x"])  # the whole sequence in one graph: full backpropagation through time
        # the objective exact=True gives: the sum of the segments' losses (each a mean over its scored steps)
        loss = sum(
            segment_loss(logits[:, t : t + segment_length], batch["y"][:, t : t + segment_length])
            for t in range(0, small.length, segment_length)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_default_dtype(torch.float32)

    same, largest = difference(model, reference)
    print(
        f"exact=True against a hand-written full-BPTT loop (float64, 2 steps): allclose {same}, max diff {largest:.1e}"
    )
    if not same:
        sys.exit("FAILED: exact=True's parameters differ from full BPTT's")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--lag", type=int, default=8, help="the target is the symbol this many steps earlier")
    parser.add_argument("--length", type=int, default=64, help="steps per sequence")
    parser.add_argument("--vocab", type=int, default=8, help="symbols (chance is 1/vocab)")
    parser.add_argument("--segment-length", type=int, default=None, help="TBPTT segment length (default: lag / 2)")
    parser.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--batches", type=int, default=100, help="training batches per epoch")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training batches")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the weights")
    args = parser.parse_args(argv)
    segment_length = args.segment_length or max(args.lag // 2, 1)

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch 2.13 (not about this script)

    batches = make_batches(args.batches, args.batch_size, args, seed=args.seed)
    (held_out,) = make_batches(1, 512, args, seed=args.seed + 1)
    torch.manual_seed(args.seed)
    initial = Copier(args.vocab, args.hidden_size, args.lr)  # every run starts from these weights
    print(
        f"copy task: lag {args.lag}, {args.length} steps, {args.vocab} symbols (chance {1 / args.vocab:.3f});"
        f" segments of {segment_length} steps; {args.batches} batches x {args.epochs} epochs"
    )

    runs = {
        f"truncated, segment_length={segment_length}": [TBPTTCallback(segment_length=segment_length)],
        f"exact=True, segment_length={segment_length}": [TBPTTCallback(segment_length=segment_length, exact=True)],
        "full BPTT (no callback)": [],
    }
    results = {}
    for name, callbacks in runs.items():
        model = copy.deepcopy(initial)
        began = time.perf_counter()
        steps = fit(model, batches, callbacks, args.epochs, clip=1.0)
        results[name] = accuracy(model.eval(), held_out)
        seconds = time.perf_counter() - began
        print(f"{name:34} {steps:6} optimizer steps {seconds:6.1f} s   held-out accuracy {results[name]:.3f}")

    truncated, exact, _ = results.values()
    if not exact > max(truncated + 0.2, 2 / args.vocab):
        sys.exit(f"FAILED: exact=True ({exact:.3f}) does not beat truncation ({truncated:.3f})")

    exact_equals_full_bptt(args)


if __name__ == "__main__":
    main()
