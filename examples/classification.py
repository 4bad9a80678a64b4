"""Classifying padded sequences of very different lengths, with the loss at each sequence's last valid step.

Every sequence is noise of its own length (from ``--min-length`` to ``--max-length`` steps, log-uniformly), with one
short motif, one of four, hidden at a random place; the label is which motif. Nothing near the end of a sequence
tells it: the model must notice the motif wherever it is and remember it to the last step, so the label is only
recoverable from the whole sequence. Sequences are padded per batch and the batch carries their lengths.

``TBPTTCallback(lengths="lengths", step_per="batch")`` cuts each padded batch into segments, skips the segments that
are all padding, gives each segment its own lengths and validity mask (:func:`~lightning_tbptt.current_segment`), and
takes one optimizer step per batch with the gradients of all its segments. The model scores each sequence once, at
its last valid step, in whichever segment that falls; at every other valid step it also makes a running guess,
scored with :func:`~lightning_tbptt.masked_mean` and :class:`~lightning_tbptt.MaskedMetric` so that padding counts
nowhere.

The script checks that the held-out accuracy is well above chance (1/4), and that padding changes nothing: one
training step on a batch padded with zeros to its longest sequence, and on the same batch padded with large random
values to three times that, give the same parameters.

    python examples/classification.py                 # 2,048 sequences of 20 to 1,000 steps, about a minute
    python examples/classification.py --epochs 3      # a quick look
"""

import argparse
import copy
import functools
import logging
import sys
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_tbptt import MaskedMetric, TBPTTCallback, current_segment, masked_mean

# The small setting CI runs this script with (a few seconds on one core).
CI_ARGV = ["--train-size=256", "--val-size=128", "--max-length=150", "--epochs=20", "--batch-size=16"]

# The four motifs (8 steps each); the label of a sequence is the index of the one hidden in it.
MOTIFS = torch.tensor(
    [
        [1, 1, 1, 1, -1, -1, -1, -1],
        [-1, -1, -1, -1, 1, 1, 1, 1],
        [1, -1, 1, -1, 1, -1, 1, -1],
        [1, 1, -1, -1, 1, 1, -1, -1],
    ],
    dtype=torch.float32,
)
CLASSES = len(MOTIFS)


def make_sequences(count: int, args: argparse.Namespace, seed: int) -> list[tuple[torch.Tensor, int]]:
    """``count`` (sequence ``(T, 1)``, label) pairs of lengths drawn log-uniformly, one motif in each."""
    generator = torch.Generator().manual_seed(seed)
    low, high = torch.log(torch.tensor(float(args.min_length))), torch.log(torch.tensor(float(args.max_length)))
    lengths = torch.exp(low + (high - low) * torch.rand(count, generator=generator)).round().long()
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    sequences = []
    for length, label in zip(lengths.tolist(), labels.tolist(), strict=True):
        x = args.noise * torch.randn(length, generator=generator)
        where = int(torch.randint(0, length - MOTIFS.shape[1] + 1, (1,), generator=generator))
        x[where : where + MOTIFS.shape[1]] += MOTIFS[label]
        sequences.append((x.unsqueeze(-1), label))
    return sequences


def pad_collate(
    items: list[tuple[torch.Tensor, int]], pad_to: int | None = None, garbage: bool = False
) -> dict[str, torch.Tensor]:
    """Pad (sequence, label) pairs to the longest sequence (or to ``pad_to`` steps), and give their lengths.

    The padding is zeros, or with ``garbage=True`` large random values: what it holds must not matter.
    """
    xs, labels = zip(*items, strict=True)
    lengths = torch.tensor([len(each) for each in xs])
    x = pad_sequence(list(xs), batch_first=True)  # (B, T_max, 1), zeros after each sequence's end
    if pad_to is not None:
        x = F.pad(x, (0, 0, 0, pad_to - x.shape[1]))
    if garbage:
        padding = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
        x[padding] = 100 * torch.randn(int(padding.sum()), 1)
    # "lengths" is cut per segment by the callback (each segment gets its own); "total" is a per-sequence tensor
    # like the labels, passed unchanged into every segment: where each sequence ends in the whole batch
    return {"x": x, "label": torch.tensor(labels), "lengths": lengths, "total": lengths.clone()}


class MotifClassifier(pl.LightningModule):
    """An LSTM over the sequence, a linear classifier of its output, scored at the last valid step."""

    def __init__(self, hidden_size: int, lr: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, CLASSES)
        self.lr = lr
        self.val_accuracy = MulticlassAccuracy(num_classes=CLASSES, average="micro")  # one prediction per sequence
        self.val_running = MaskedMetric(
            MulticlassAccuracy(num_classes=CLASSES, average="micro")
        )  # a guess at every valid step

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-step logits, the logits at the last valid step of the rows that end in this segment, their labels."""
        out, _ = self.lstm(batch["x"])  # no state passed: the callback carries it from segment to segment
        logits = self.head(out)  # (B, T_seg, classes)
        segment = current_segment()
        last = batch["total"] - 1 - segment.start  # each sequence's last valid step, counted in this segment
        rows = ((last >= 0) & (last < segment.length)).nonzero().squeeze(1)  # the rows that end in this segment
        return logits, logits[rows, last[rows]], batch["label"][rows]

    def running_guess_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the guess made at every valid step (padding left out by the mask)."""
        per_step = F.cross_entropy(logits.transpose(1, 2), label[:, None].expand(-1, logits.shape[1]), reduction="none")
        return masked_mean(per_step)  # averaged over the valid steps of the running segment only

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits, final, label = self.step(batch)
        # summed over the rows ending here and divided by the batch size: the segments of a batch add up to the
        # batch's mean loss per sequence (one optimizer step per batch sums the segments' gradients); a segment in
        # which no sequence ends has loss 0 and a zero gradient
        loss = F.cross_entropy(final, label, reduction="sum") / batch["x"].shape[0]
        # logged as a mean over valid steps: the callback weights each segment by its number of valid steps
        self.log("train_running_loss", self.running_guess_loss(logits.detach(), batch["label"]), on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, final, label = self.step(batch)
        if len(label):  # (torchmetrics' classification metrics refuse an update with no element)
            self.val_accuracy.update(final.argmax(-1), label)  # the sequences that end in this segment
        running_label = batch["label"][:, None].expand(-1, logits.shape[1])
        self.val_running.update(logits.argmax(-1), running_label)  # only the valid steps reach the accuracy
        self.log("val_accuracy", self.val_accuracy, on_epoch=True)
        self.log("val_running_accuracy", self.val_running, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def trainer_for(callback: TBPTTCallback, **kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        callbacks=[callback],
        gradient_clip_val=1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,  # type: ignore[arg-type]
    )


def padding_changes_nothing(args: argparse.Namespace) -> None:
    """One step on a batch padded with zeros to its longest sequence, and on the same batch padded with large random
    values to 3x that: the same parameters."""
    items = make_sequences(8, args, seed=args.seed + 2)
    longest = max(len(x) for x, _ in items)
    torch.manual_seed(args.seed)
    start = MotifClassifier(args.hidden_size, args.lr)
    results = []
    for collate in (pad_collate, functools.partial(pad_collate, pad_to=3 * longest, garbage=True)):
        model = copy.deepcopy(start)
        callback = TBPTTCallback(segment_length=args.segment_length, lengths="lengths", step_per="batch")
        trainer_for(callback, max_steps=1).fit(model, DataLoader(items, batch_size=len(items), collate_fn=collate))
        results.append(model)
    tight, loose = results
    same = all(torch.allclose(a, b) for a, b in zip(tight.parameters(), loose.parameters(), strict=True))
    moved = not all(torch.equal(a, b) for a, b in zip(tight.parameters(), start.parameters(), strict=True))
    print(
        f"padding check: one step with {longest} steps padded with zeros and with {3 * longest} padded with random"
        f" values of size 100 gives the same parameters: {same}"
    )
    if not (same and moved):
        sys.exit("FAILED: padding changed the result of a training step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--train-size", type=int, default=2048, help="training sequences")
    parser.add_argument("--val-size", type=int, default=512, help="held-out sequences")
    parser.add_argument("--min-length", type=int, default=20, help="shortest sequence")
    parser.add_argument("--max-length", type=int, default=1000, help="longest sequence")
    parser.add_argument("--noise", type=float, default=0.3, help="standard deviation of the noise around the motif")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--segment-length", type=int, default=50, help="TBPTT segment length")
    parser.add_argument("--hidden-size", type=int, default=32, help="LSTM hidden size")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the training sequences")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch 2.13 (not about this script)
    warnings.filterwarnings("ignore", ".*have no `val_dataloader`.*")

    padding_changes_nothing(args)

    train, held_out = (
        make_sequences(args.train_size, args, args.seed),
        make_sequences(args.val_size, args, args.seed + 1),
    )
    lengths = torch.tensor([len(x) for x, _ in train])
    print(
        f"{len(train)} training and {len(held_out)} held-out sequences of {int(lengths.min())} to"
        f" {int(lengths.max())} steps (median {int(lengths.median())}); {CLASSES} classes, chance 1/{CLASSES}"
    )
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=pad_collate)
    val_loader = DataLoader(held_out, batch_size=args.batch_size, collate_fn=pad_collate)

    torch.manual_seed(args.seed)
    model = MotifClassifier(args.hidden_size, args.lr)
    callback = TBPTTCallback(segment_length=args.segment_length, lengths="lengths", step_per="batch")
    trainer = trainer_for(callback, max_epochs=args.epochs, inference_mode=False)
    began = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    seconds = time.perf_counter() - began
    accuracy = float(trainer.callback_metrics["val_accuracy"])
    running = float(trainer.callback_metrics["val_running_accuracy"])
    print(
        f"held-out accuracy at the last valid step: {accuracy:.3f} (chance {1 / CLASSES:.2f});"
        f" running guess over all valid steps: {running:.3f}"
    )
    print(f"{trainer.global_step} optimizer steps (one per batch) in {seconds:.1f} s")

    # accuracy by length, with one plain forward pass per sequence (no callback, no padding)
    model.eval()
    with torch.no_grad():
        hits = torch.tensor([int(model.head(model.lstm(x[None])[0][0, -1]).argmax()) == y for x, y in held_out])
    held_lengths = torch.tensor([len(x) for x, _ in held_out])
    longest = int(held_lengths.max())
    for low, high in [
        (0, args.segment_length),
        (args.segment_length, 4 * args.segment_length),
        (4 * args.segment_length, longest),
    ]:
        chosen = (held_lengths > low) & (held_lengths <= high)
        if chosen.any():
            share = float(hits[chosen].float().mean())
            print(f"  lengths {low + 1}-{min(high, longest)}: accuracy {share:.3f} ({int(chosen.sum())} sequences)")
    if accuracy < 2 / CLASSES:  # well above chance: at least twice it
        sys.exit(f"FAILED: held-out accuracy {accuracy:.3f} is not well above chance ({1 / CLASSES:.2f})")


if __name__ == "__main__":
    main()
