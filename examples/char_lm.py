"""Train a character-level LSTM language model on the Python standard library's own source code with TBPTT.

The corpus needs no download: the ``.py`` files of the running interpreter's standard library, concatenated. The model
is written as if its sequences were short (``out, _ = self.lstm(x)``); ``TBPTTCallback`` cuts every batch of long
sequences into segments, steps the optimizer after each one and carries the LSTM state across them.

    python examples/char_lm.py                   # about a minute on 2 CPU cores
    python examples/char_lm.py --chars 4000000 --epochs 3 --segment-length 128
"""

import argparse
import math
import resource
import sysconfig
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tbptt import TBPTTCallback

VOCAB = 256  # bytes


def stdlib_corpus(num_chars: int) -> bytes:
    """The first ``num_chars`` bytes of the standard library's ``.py`` files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= num_chars:
            break
    corpus = b"".join(parts)[:num_chars]
    if len(corpus) < num_chars:
        raise SystemExit(f"the standard library at {root} holds only {len(corpus)} characters; lower --chars")
    return corpus


def sequences(data: torch.Tensor, num_sequences: int) -> TensorDataset:
    """Cut ``data`` into ``num_sequences`` long sequences of inputs and next-character targets."""
    length = (len(data) - 1) // num_sequences
    x = data[: num_sequences * length].view(num_sequences, length)
    y = data[1 : num_sequences * length + 1].view(num_sequences, length)
    return TensorDataset(x, y)


def unigram_bits(data: torch.Tensor) -> float:
    counts = Counter(data.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


class CharLM(pl.LightningModule):
    """A plain character-level language model: nothing about TBPTT appears in it."""

    def __init__(self, embedding_size: int = 64, hidden_size: int = 256, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out)

    def bits_per_char(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten()) / math.log(2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        bpc = self.bits_per_char(batch)
        self.log("train_bpc", bpc, prog_bar=True)
        return bpc

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_bpc", self.bits_per_char(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=1_200_000, help="characters of the corpus to use")
    parser.add_argument("--sequences", type=int, default=32, help="long training sequences per batch")
    parser.add_argument("--sequence-length", type=int, default=4096, help="characters per training sequence")
    parser.add_argument("--segment-length", type=int, default=128, help="TBPTT segment length")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    data = torch.frombuffer(bytearray(stdlib_corpus(args.chars)), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    train_set = sequences(train, len(train) // args.sequence_length)
    val_set = sequences(held_out, 8)
    print(
        f"corpus: {len(data):,} characters of the standard library's source; {len(train_set)} training sequences"
        f" of {args.sequence_length} characters, held-out: {len(val_set)} sequences of {val_set[0][0].numel()}"
    )

    model = CharLM(hidden_size=args.hidden_size)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[TBPTTCallback(segment_length=args.segment_length)],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    val_loader = DataLoader(val_set, batch_size=len(val_set))
    before = trainer.validate(model, val_loader, verbose=False)[0]["val_bpc"]
    start = time.perf_counter()
    trainer.fit(model, DataLoader(train_set, batch_size=args.sequences, shuffle=True), val_loader)
    seconds = time.perf_counter() - start
    after = trainer.callback_metrics["val_bpc"].item()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"optimizer steps: {trainer.global_step} in {seconds:.0f} s ({trainer.global_step / seconds:.1f} steps/s)")
    print(f"held-out bits per character: {before:.3f} before training, {after:.3f} after")
    print(f"unigram entropy of the corpus: {unigram_bits(data):.3f} bits per character")
    print(f"peak memory (RSS): {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
