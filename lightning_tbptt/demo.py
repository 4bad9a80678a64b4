"""The main job: a character-level LSTM language model trained on the Python standard library's own source code.

``lightning-tbptt demo`` (or ``python -m lightning_tbptt demo``) reads the ``.py`` files of the running interpreter's
standard library (no download), concatenates them into one sequence of about 10^7 characters, writes it to a ``.npy``
file and streams it as lanes with :class:`~lightning_tbptt.LaneDataModule`; :class:`~lightning_tbptt.TBPTTCallback`
(``streaming=True``) cuts every batch into segments, steps the optimizer after each one and carries every lane's LSTM
state from segment to segment and from batch to batch. The model below is written as if its sequences were short
(``out, _ = self.lstm(x)``). The end of the corpus is held out: validation streams it the same way, segmented.

The default run (512 optimizer steps on 32 lanes of 128 characters: 2.1 million characters) takes a few minutes on 2
CPU cores and prints the held-out bits per character before training, at every validation and at the
end, next to the unigram entropy of the corpus (what a model that ignores context reaches). Only the public API of
``lightning_tbptt`` is used: the code is meant to be read as an example.

    lightning-tbptt demo                                     # the default run
    lightning-tbptt demo --max-steps 6000 --checkpoint-dir runs/demo
    lightning-tbptt demo --max-steps 12000 --checkpoint-dir runs/demo --resume last
    lightning-tbptt demo --segment-length 64 --stride 32 --accelerator gpu
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tbptt import LaneDataModule, TBPTTCallback

VOCAB = 256  # the corpus is read as bytes


def stdlib_sources(num_chars: int) -> tuple[bytes, int, Path]:
    """The first ``num_chars`` bytes of the standard library's ``.py`` files (tests left out), in sorted path order.

    Returns the corpus, the number of files read and the standard library's folder.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if {"site-packages", "test", "tests"} & set(path.relative_to(root).parts):
            continue
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= num_chars:
            break
    corpus = b"".join(parts)[:num_chars]
    if len(corpus) < num_chars:
        raise SystemExit(
            f"error: argument --chars: the standard library at {root} holds {len(corpus):,} characters of source,"
            f" fewer than --chars {num_chars:,}; pass a smaller --chars"
        )
    return corpus, len(parts), root


def unigram_entropy(corpus: np.ndarray) -> float:
    """Bits per character of the corpus' character frequencies: what a model that ignores context reaches."""
    counts = np.bincount(corpus, minlength=VOCAB)
    p = counts[counts > 0] / len(corpus)
    return float(-(p * np.log2(p)).sum())


class CharLM(pl.LightningModule):
    """A plain character-level language model: nothing about TBPTT, lanes or state appears in it."""

    def __init__(self, embedding_size: int = 64, hidden_size: int = 256, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, VOCAB)

    def bits_per_char(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the next character, in bits."""
        out, _ = self.lstm(self.embed(batch["input"].long()))
        logits = self.head(out)
        return F.cross_entropy(logits.flatten(0, 1), batch["target"].long().flatten()) / math.log(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Written for one short batch; runs once per segment."""
        bpc = self.bits_per_char(batch)
        self.log("train_bpc", bpc, prog_bar=True)
        return bpc

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Logs the held-out bits per character (weighted by the characters of each segment)."""
        self.log("val_bpc", self.bits_per_char(batch), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class StepsProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's bar, sized to the batches a ``max_steps`` run trains: ``steps_per_batch`` optimizer steps each.

    Lightning's own bar assumes one optimizer step per batch when it sizes a run given in steps. With a burn-in, the
    first batch of an epoch steps less often: one batch more is allowed for.
    """

    def __init__(self, steps_per_batch: int, burn_in: bool, refresh_rate: int) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.steps_per_batch = steps_per_batch
        self.burn_in = burn_in

    @property
    def total_train_batches(self) -> int | float:
        """The batches of this epoch the run trains."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        remaining = -(-(trainer.max_steps - trainer.global_step) // self.steps_per_batch)
        return min(trainer.num_training_batches, done + remaining + int(self.burn_in and done == 0))


class ValidationHistory(pl.Callback):
    """Records the held-out bits per character after every validation run of the fit."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Records the epoch-level ``val_bpc`` of a validation run inside the fit."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking and "val_bpc" in trainer.callback_metrics:
            self.rows.append((trainer.global_step, trainer.callback_metrics["val_bpc"].item()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags."""
    run = parser.add_argument_group("length of the run")
    run.add_argument("--max-steps", type=int, default=512, help="optimizer steps (segments) to train; default: 512")
    run.add_argument("--val-every", type=int, default=16, help="validate every this many batches; default: 16")
    data = parser.add_argument_group("data")
    data.add_argument("--chars", type=int, default=10_000_000, help="characters of the corpus; default: 10,000,000")
    data.add_argument("--held-out", type=int, default=100_000, help="characters held out for validation (the end)")
    data.add_argument("--lanes", type=int, default=32, help="training lanes (rows per batch); default: 32")
    data.add_argument("--eval-lanes", type=int, default=16, help="validation lanes; default: 16")
    data.add_argument("--batch-steps", type=int, default=1024, help="characters per lane per batch; default: 1024")
    tbptt = parser.add_argument_group("truncated backpropagation through time")
    tbptt.add_argument("--segment-length", type=int, default=128, help="TBPTT segment length k2; default: 128")
    tbptt.add_argument("--stride", type=int, default=None, help="overlapping windows: a window every k1 steps")
    tbptt.add_argument("--burn-in", type=int, default=0, help="steps run without gradient where a stream starts")
    model = parser.add_argument_group("model and hardware")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--embedding-size", type=int, default=64)
    model.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate; default: 0.003")
    model.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto (Lightning's); default: auto")
    model.add_argument("--devices", default="1", help="Lightning's `devices`; default: 1")
    model.add_argument("--precision", default="32-true", help="Lightning's `precision`, e.g. bf16-mixed")
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    model.add_argument("--seed", type=int, default=0)
    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument("--checkpoint-dir", type=Path, default=None, help="save checkpoints (last.ckpt) here")
    checkpoints.add_argument("--resume", default=None, help="a checkpoint to resume from, or `last` (--checkpoint-dir)")


def _check(args: argparse.Namespace) -> str | None:
    """Refuse bad flags with the flag, the value and what to do; return the checkpoint to resume from."""
    positive = ["max_steps", "val_every", "chars", "held_out", "lanes", "eval_lanes", "batch_steps"]
    for name in [*positive, "segment_length", "hidden_size", "embedding_size"]:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: argument {flag}: expected a positive integer, got {getattr(args, name)}")
    if args.held_out * 10 > args.chars:
        raise SystemExit(
            f"error: argument --held-out: expected at most a tenth of --chars ({args.chars // 10:,}), got"
            f" {args.held_out:,}; pass a smaller --held-out"
        )
    if args.resume is None:
        return None
    if args.resume == "last":
        if args.checkpoint_dir is None:
            raise SystemExit("error: argument --resume: `last` needs --checkpoint-dir (where last.ckpt is)")
        path = args.checkpoint_dir / "last.ckpt"
    else:
        path = Path(args.resume)
    if not path.is_file():
        raise SystemExit(f"error: argument --resume: no checkpoint at {path}; pass a .ckpt file, or `last`")
    return str(path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and validate as the flags say, print the report and return its numbers."""
    resume = _check(args)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
    # `LaneDataModule` resumes its stream itself, at the batch the callback restores (Lightning cannot know)
    warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.* is deprecated")  # Lightning on newer torch
    if resume is not None:  # resuming writes on into the directory of the checkpoint
        warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    started = time.perf_counter()

    raw, num_files, root = stdlib_sources(args.chars)
    corpus = np.frombuffer(raw, dtype=np.uint8)
    split = len(corpus) - args.held_out
    entropy = unigram_entropy(corpus)
    folder = tempfile.TemporaryDirectory(prefix="lightning-tbptt-demo-")
    train_path, val_path = Path(folder.name) / "train.npy", Path(folder.name) / "val.npy"
    np.save(train_path, corpus[:split])  # read back as memory maps, slice by slice
    np.save(val_path, corpus[split:])
    data = LaneDataModule(
        str(train_path),
        str(val_path),
        lanes=args.lanes,
        steps=args.batch_steps,
        eval_lanes=args.eval_lanes,
        target_shift=1,
    )
    model = CharLM(args.embedding_size, args.hidden_size, args.lr)
    callback = TBPTTCallback(
        segment_length=args.segment_length, streaming=True, resets="starts", stride=args.stride, burn_in=args.burn_in
    )
    history = ValidationHistory()
    callbacks: list[pl.Callback] = [callback, history]
    if args.checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.checkpoint_dir, save_last=True))
    steps_per_batch = -(-args.batch_steps // (args.stride or args.segment_length))
    callbacks.append(StepsProgressBar(steps_per_batch, args.burn_in > 0, refresh_rate=1 if sys.stdout.isatty() else 8))
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        max_epochs=-1,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        callbacks=callbacks,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=args.checkpoint_dir is not None,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    say = trainer.print
    say(
        f"corpus: {len(corpus):,} characters of source from {num_files} files of the Python"
        f" {sys.version_info.major}.{sys.version_info.minor} standard library ({root})"
    )
    say(
        f"training: {split:,} characters as {args.lanes} lanes of {split // args.lanes:,}, {args.batch_steps} per"
        f" batch; held out: {args.held_out:,} characters as {args.eval_lanes} lanes"
    )
    window = f", a window every {args.stride}" if args.stride else ""
    say(
        f"model: LSTM {args.hidden_size} units, {sum(p.numel() for p in model.parameters()):,} parameters; TBPTT"
        f" segments of {args.segment_length} characters{window}, state carried across batches"
    )

    before = None
    if resume is None:
        before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
        say(f"held-out bits per character before training: {before:.3f}")
    trainer.fit(model, datamodule=data, ckpt_path=resume)
    rows = list(history.rows)
    if not rows or rows[-1][0] != trainer.global_step:
        rows.append((trainer.global_step, trainer.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]))
    after = rows[-1][1]
    seconds = time.perf_counter() - started
    peak_mib = _peak_rss_mib()

    chars_per_step = args.lanes * (args.stride or args.segment_length)
    say("\nheld-out bits per character:")
    say(f"  {'optimizer step':>14}  {'characters trained':>18}  {'bits/char':>9}")
    if before is not None:
        say(f"  {0:>14}  {0:>18,}  {before:>9.3f}")
    for step, bpc in rows:
        say(f"  {step:>14}  {step * chars_per_step:>18,}  {bpc:>9.3f}")
    say(f"unigram entropy of the corpus: {entropy:.3f} bits per character")
    first = before if before is not None else rows[0][1]
    improved = after < first
    below = after < entropy
    say(
        f"result: held-out {after:.3f} bits per character after {trainer.global_step} steps"
        f" ({'improved from' if improved else 'NOT improved from'} {first:.3f});"
        + (
            f" below the unigram entropy {entropy:.3f} by {entropy - after:.3f}"
            if below
            else f" NOT below the unigram entropy {entropy:.3f}"
        )
    )
    say(f"peak memory: {peak_mib:,.0f} MiB resident (the corpus is memory-mapped, read batch by batch)")
    if trainer.strategy.root_device.type == "cuda":
        cuda_mib = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        say(f"peak GPU memory: {cuda_mib:,.0f} MiB allocated (one segment of a batch on the device at a time)")
    say(f"time: {seconds:.0f} s")
    if args.checkpoint_dir is not None:
        say(
            f"checkpoint: {args.checkpoint_dir / 'last.ckpt'}, saved at every validation. After an interruption,"
            " --resume last continues exactly where that validation left off; after a completed run Lightning counts"
            " the epoch as finished, and a larger --max-steps continues from the start of the corpus (a new epoch)."
        )
    folder.cleanup()
    return {
        "before": before,
        "history": rows,
        "after": after,
        "unigram_entropy": entropy,
        "global_step": trainer.global_step,
        "peak_mib": peak_mib,
        "seconds": seconds,
    }


def _peak_rss_mib() -> float:
    """Peak resident set size of this process (NaN where the platform does not tell)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
