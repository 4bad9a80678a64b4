"""The main job: a character-level LSTM language model trained on the Python standard library's own source code.

``lightning-tbptt demo`` (or ``python -m lightning_tbptt demo``) reads the ``.py`` files of the running interpreter's
standard library (no download), concatenates them into one sequence of about 10^7 characters, writes it to a ``.npy``
file and streams it as lanes with :class:`~lightning_tbptt.LaneDataModule`; :class:`~lightning_tbptt.TBPTTCallback`
(``streaming=True``) cuts every batch into segments, steps the optimizer after each one and carries every lane's LSTM
state from segment to segment and from batch to batch. Its model (``CharLM``) is written as if its sequences were
short (``out, _ = self.lstm(x)``). The end of the corpus is held out: validation streams it the same way, segmented.

The default run (1,024 optimizer steps on 32 lanes of 128 characters: 4.2 million characters) takes about two and a
half minutes on 2 CPU cores and prints the held-out bits per character before training, at every validation and at the
end, next to the unigram entropy of the corpus (what a model that ignores context reaches). Only the public API of
``lightning_tbptt`` is used: the code is meant to be read as an example.

    lightning-tbptt demo                                     # the default run
    lightning-tbptt demo --max-steps 6000 --checkpoint-dir runs/demo
    lightning-tbptt demo --max-steps 12000 --checkpoint-dir runs/demo --resume last
    lightning-tbptt demo --segment-length 64 --stride 32 --accelerator gpu

Ctrl-C stops a run after the running batch, saves ``last.ckpt`` there (with ``--checkpoint-dir``) and prints the
command that resumes it; ``--resume`` refuses data, segment and model flags that differ from the checkpoint's.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import shlex
import signal
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightning_tbptt import DynamicEvaluation, LaneDataModule, RandomLengths, Stepper, TBPTTCallback

if TYPE_CHECKING:
    import pytorch_lightning as pl
else:
    try:
        import pytorch_lightning as pl
    except ImportError:  # only the `lightning` package is installed
        import lightning.pytorch as pl

VOCAB = 256  # the corpus is read as bytes


def stdlib_sources(num_chars: int) -> tuple[np.ndarray, int, Path]:
    """The first ``num_chars`` bytes of the standard library's ``.py`` files (tests left out), in sorted path order.

    Returns the corpus (``uint8``), the number of files read and the standard library's folder.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths, available = [], 0
    for path in sorted(root.rglob("*.py")):
        if available >= num_chars:
            break
        if not {"site-packages", "test", "tests"} & set(path.relative_to(root).parts):
            paths.append(path)
            available += path.stat().st_size
    if available < num_chars:
        raise SystemExit(
            f"error: argument --chars: the standard library at {root} holds {available:,} characters of source,"
            f" fewer than --chars {num_chars:,}; pass a smaller --chars"
        )
    corpus = np.empty(num_chars, dtype=np.uint8)
    filled = 0
    for path in paths:
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8)[: num_chars - filled]
        corpus[filled : filled + len(data)] = data
        filled += len(data)
    return corpus[:filled], len(paths), root


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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The logits of the next character after each of ``tokens`` ``(B, T)``."""
        out, _ = self.lstm(self.embed(tokens.long()))
        logits: torch.Tensor = self.head(out)
        return logits

    def bits_per_char(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of the next character, in bits."""
        logits = self(batch["input"])
        return F.cross_entropy(logits.flatten(0, 1), batch["target"].long().flatten()) / math.log(2)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Written for one short batch; runs once per segment."""
        bpc = self.bits_per_char(batch)
        self.log("train_bpc", bpc, prog_bar=True)
        return bpc

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Logs the held-out bits per character (weighted by the characters of each segment), over all processes.

        Returns them too: the loss that dynamic evaluation adapts on.
        """
        bpc = self.bits_per_char(batch)
        self.log("val_bpc", bpc, prog_bar=True, sync_dist=True)  # every process's lanes
        return bpc

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class StepsProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's TQDM bar, sized to the batches a run of ``max_steps`` optimizer steps trains.

    Lightning's own bar assumes one optimizer step per batch when it sizes a run given in steps; here a batch of
    ``batch_steps`` steps takes as many steps as ``tbptt`` trains segments in it (fewer in the first batch of an epoch,
    the one with the burn-in).
    """

    def __init__(self, batch_steps: int, tbptt: TBPTTCallback, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_steps = batch_steps
        self.tbptt = tbptt

    @property
    def total_train_batches(self) -> int | float:
        """The batches of this epoch that the run trains (read by Lightning as an epoch starts)."""
        return self._planned(done=0)

    def _planned(self, done: int) -> int | float:
        """The batches of this epoch that the run trains, ``done`` of them already."""
        trainer = self.trainer
        remaining, batches = trainer.max_steps - trainer.global_step, done
        while remaining > 0 and batches < trainer.num_training_batches:
            # the epoch's first batch has the burn-in; with `random_lengths` each batch has the segments drawn for it
            remaining -= self.tbptt.training_segments(
                self.batch_steps, fresh=batches == 0, epoch=trainer.current_epoch, batch=batches
            )
            batches += 1
        return min(batches, trainer.num_training_batches)

    def trained_batches(self) -> tuple[int, int | float | None] | None:
        """The batches the bar counted and planned; ``None`` where no training epoch started (a resumed, done run)."""
        try:
            bar = self.train_progress_bar
        except TypeError:  # Lightning's bar has none yet
            return None
        return bar.n, bar.total

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Close the bars where the fit stops (Ctrl-C), so that they are not drawn again below the report."""
        for name in ("train_progress_bar", "val_progress_bar"):
            with contextlib.suppress(TypeError):  # Lightning's bar has none
                getattr(self, name).close()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Size the bar again where the epoch did not start from its first batch (a fit resumed in the middle).

        Lightning 2.5 and later skip the epoch start there, so the bar has no total; earlier releases size it as if
        the epoch started at its first batch.
        """
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        bar = self.train_progress_bar
        planned = self._planned(done=idx)
        if bar.total != planned:
            if bar.total is None:
                bar.set_description(f"Epoch {trainer.current_epoch}")
            bar.reset(total=planned)
            bar.n = bar.initial = idx


class History(pl.Callback):
    """The held-out bits per character of every validation, and the characters read for training before it.

    Saved in checkpoints (Lightning calls ``state_dict``/``load_state_dict``), so a resumed run reports the whole run.
    """

    def __init__(self) -> None:
        self.before: float | None = None
        self.rows: list[tuple[int, int, float]] = []
        self.characters = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the characters of the batch, over all processes."""
        self.characters += int(batch["input"].numel()) * trainer.world_size

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch-level ``val_bpc`` of a validation run inside the fit."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking and "val_bpc" in trainer.callback_metrics:
            if self.rows and self.rows[-1][0] == trainer.global_step:
                return  # Lightning before 2.5 validates again where it resumes from a validation's checkpoint
            self.rows.append((trainer.global_step, self.characters, trainer.callback_metrics["val_bpc"].item()))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the history."""
        return {"before": self.before, "rows": self.rows, "characters": self.characters}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of the run being resumed."""
        self.before = state_dict["before"]
        self.rows = [(int(step), int(characters), float(bpc)) for step, characters, bpc in state_dict["rows"]]
        self.characters = state_dict["characters"]


class Probes(pl.Callback):
    """The results of the truncation probes of this run (``--probe``), in order."""

    def __init__(self, tbptt: TBPTTCallback) -> None:
        self.tbptt = tbptt
        self.results: list[Any] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Keep the probe of the batch that ended, if one ran."""
        result = self.tbptt.probe_result
        if result is not None and (not self.results or self.results[-1] is not result):
            self.results.append(result)


FLAGS_KEY = "lightning_tbptt_demo_flags"
"""The key of the demo's checkpoints that holds the flags a resumed run must repeat (see :func:`resume_flags`)."""


def resume_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide what a run trains, which a run resumed from its checkpoint must repeat.

    The data, the TBPTT segments and the model: others (``--max-steps``, ``--val-every``, the hardware) may change.
    """
    names = ["chars", "held_out", "lanes", "eval_lanes", "batch_steps", "segment_length", "stride", "burn_in"]
    return {name: getattr(args, name) for name in [*names, "hidden_size", "embedding_size", "lr"]}


class SaveLast(pl.Callback):
    """Saves ``last.ckpt`` in ``dirpath`` after every validation and after the run's last batch, with the run's flags.

    Both are saved between two batches, so resuming from them continues exactly where they were saved.
    """

    def __init__(self, dirpath: Path, flags: dict[str, Any], saved_step: int | None = None) -> None:
        self.path = dirpath / "last.ckpt"
        self.flags = flags
        self.saved_step = saved_step
        """The optimizer step ``last.ckpt`` holds (``None`` while there is none)."""

    def save(self, trainer: pl.Trainer) -> None:
        """Save ``last.ckpt`` now."""
        trainer.save_checkpoint(self.path, weights_only=False)  # everything, to resume from
        self.saved_step = trainer.global_step

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Keep the flags in the checkpoint, so that ``--resume`` can check them before anything runs."""
        checkpoint[FLAGS_KEY] = dict(self.flags)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Save after a validation inside the fit."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self.save(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Save after the run's last batch."""
        if trainer.global_step >= trainer.max_steps:
            self.save(trainer)


class Stopped(Exception):
    """Raised by :class:`CtrlC` to end the fit where Ctrl-C stopped it (caught by :func:`run`)."""


class CtrlC(pl.Callback):
    """Ctrl-C stops the fit between two batches, where a checkpoint resumes exactly.

    The first Ctrl-C (``SIGINT``) of the fit lets the running batch (and a validation that runs after it) finish, then
    saves ``last.ckpt`` (where there is a :class:`SaveLast`) and stops the fit. A second Ctrl-C raises
    ``KeyboardInterrupt`` at once, which Lightning handles; nothing is saved then, since a checkpoint saved in the
    middle of a batch (some of its segments trained) does not resume exactly.
    """

    def __init__(self, save: SaveLast | None) -> None:
        self.save = save
        self.requested = False
        self.stopped_at: int | None = None
        """The optimizer step where the first Ctrl-C stopped the fit, between two batches."""
        self.interrupted_at: int | None = None
        """The optimizer step where a ``KeyboardInterrupt`` (a second Ctrl-C) stopped the fit at once."""
        self._previous: Any = None
        self._installed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Catch Ctrl-C (signal handlers can only be set from the main thread)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._request)
            self._installed = True

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C raises KeyboardInterrupt at once
        print(
            "\nCtrl-C: stopping after this batch, where a checkpoint resumes exactly (Ctrl-C again stops at once,"
            " without saving)",
            file=sys.stderr,
            flush=True,
        )

    def _restore(self) -> None:
        if self._installed:  # a handler not set from Python reads as None
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)
            self._installed = False

    def _stop_if_requested(self, trainer: pl.Trainer, saved: bool = False) -> None:
        requested = self.requested
        if trainer.world_size > 1:  # every process stops at the same batch
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            if self.save is not None and not saved:
                self.save.save(trainer)
            self.stopped_at = trainer.global_step
            raise Stopped

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Stop between two batches after a Ctrl-C."""
        self._stop_if_requested(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop after a validation inside the fit, after a Ctrl-C during it."""
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._stop_if_requested(trainer, saved=True)  # by `SaveLast`, whose hook ran before

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Note a ``KeyboardInterrupt`` (Lightning catches it) and give Ctrl-C back."""
        self._restore()
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted_at = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give Ctrl-C back."""
        self._restore()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line flags: every help string is plain text and ends with the flag's default."""
    run = parser.add_argument_group("length of the run")
    run.add_argument(
        "--max-steps",
        type=int,
        default=1024,
        help="optimizer steps (segments) to train, to the end of the batch they end in; default: 1024",
    )
    run.add_argument("--val-every", type=int, default=32, help="validate every this many batches; default: 32")
    data = parser.add_argument_group("data")
    data.add_argument("--chars", type=int, default=10_000_000, help="characters of the corpus; default: 10,000,000")
    data.add_argument(
        "--held-out",
        type=int,
        default=100_000,
        help="characters at the end of the corpus held out for validation (at most a tenth of --chars);"
        " default: 100,000",
    )
    data.add_argument("--lanes", type=int, default=32, help="training lanes (rows per batch); default: 32")
    data.add_argument("--eval-lanes", type=int, default=16, help="validation lanes; default: 16")
    data.add_argument("--batch-steps", type=int, default=1024, help="characters per lane per batch; default: 1024")
    tbptt = parser.add_argument_group("truncated backpropagation through time")
    tbptt.add_argument("--segment-length", type=int, default=128, help="TBPTT segment length k2; default: 128")
    tbptt.add_argument(
        "--stride",
        type=int,
        default=None,
        help="overlapping windows: a window of --segment-length steps every STRIDE steps (k1, 1 to"
        " --segment-length); default: none (plain segments)",
    )
    tbptt.add_argument(
        "--burn-in",
        type=int,
        default=0,
        help="steps run without gradient where a stream starts from zeros (less than --batch-steps); default: 0",
    )
    tbptt.add_argument(
        "--random-lengths",
        choices=["off", "awd", "offset"],
        default="off",
        help="draw every training segment's length: awd (AWD-LSTM's rule around --segment-length) or offset (a random"
        " first cut in each batch), seeded by --seed; default: off (fixed cuts)",
    )
    tbptt.add_argument(
        "--probe",
        type=int,
        nargs="?",
        const=32,
        default=None,
        metavar="EVERY",
        help="run the truncation probe on the first batch and every EVERY-th (32 when no value is given), and report"
        " the gradient's bias at --segment-length and the shortest length below a bias of 0.1; not with --stride,"
        " --burn-in or --random-lengths; default: off",
    )
    model = parser.add_argument_group("model and hardware")
    model.add_argument("--hidden-size", type=int, default=256, help="units of the LSTM; default: 256")
    model.add_argument("--embedding-size", type=int, default=64, help="size of the character embedding; default: 64")
    model.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate; default: 0.003")
    model.add_argument(
        "--accelerator", default="auto", help="Lightning's Trainer accelerator: cpu, gpu, mps or auto; default: auto"
    )
    model.add_argument(
        "--devices",
        default="1",
        help="Lightning's Trainer devices: how many (dividing --lanes and --eval-lanes), a list such as 0,1, or auto;"
        " default: 1",
    )
    model.add_argument(
        "--precision",
        default="32-true",
        help="Lightning's Trainer precision (16-mixed or bf16-mixed on a GPU); default: 32-true",
    )
    model.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    model.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initial parameters, of --random-lengths and of the sample; default: 0",
    )
    dynamic = parser.add_argument_group("dynamic evaluation (of the final model)")
    dynamic.add_argument(
        "--dynamic-eval",
        choices=["rms", "sgd", "off"],
        default="rms",
        help="evaluate the trained model once more, adapting its weights on each held-out segment after scoring it:"
        " the rule (rms: steps normalised by training gradients' RMS; sgd: plain steps), or off; default: rms",
    )
    dynamic.add_argument(
        "--dynamic-lr", type=float, default=None, help="its step size; default: 0.001 with rms, 0.3 with sgd"
    )
    dynamic.add_argument(
        "--dynamic-decay", type=float, default=0.0, help="its pull back towards the trained weights; default: 0.0"
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--sample", type=int, default=200, help="characters to generate from the model after training; default: 200"
    )
    sampling.add_argument("--prompt", default="def", help="what the generated text continues; default: def")
    sampling.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; default: 0.8")
    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="save DIR/last.ckpt after every validation, after the last batch and where Ctrl-C stops the run;"
        " default: none (nothing saved)",
    )
    checkpoints.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="a checkpoint to resume from, or last (DIR/last.ckpt of --checkpoint-dir); the data, segment and model"
        " flags must repeat the checkpoint's; default: none (a new run)",
    )


def end_of_batch(max_steps: int, lane_length: int, batch_steps: int, tbptt: TBPTTCallback) -> int:
    """The first optimizer step at or after ``max_steps`` at which a batch ends.

    A run that ``max_steps`` stopped inside a batch would be saved with part of the batch trained, and a run resumed
    from there cannot continue as one longer run would: the demo trains to the end of that batch instead. Each epoch
    streams lanes of ``lane_length`` steps in batches of ``batch_steps`` (the last one shorter), the first with the
    burn-in; ``tbptt`` says how many segments train in each.

    >>> end_of_batch(9, lane_length=256, batch_steps=64, tbptt=TBPTTCallback(32))
    10
    >>> end_of_batch(8, lane_length=256, batch_steps=64, tbptt=TBPTTCallback(32))
    8
    """
    batches = math.ceil(lane_length / batch_steps)
    step, epoch = 0, 0
    while True:
        per_batch = [
            tbptt.training_segments(min(batch_steps, lane_length - b * batch_steps), fresh=b == 0, epoch=epoch, batch=b)
            for b in range(batches)
        ]
        if tbptt.random_lengths is None:  # every epoch alike: skip the whole ones
            step += (max_steps - step) // sum(per_batch) * sum(per_batch)
        for steps in per_batch:
            if step >= max_steps:
                return step
            step += steps
        epoch += 1


def _check(args: argparse.Namespace) -> str | None:
    """Refuse bad flags with the flag, the value and what to do; return the checkpoint to resume from."""
    positive = ["max_steps", "val_every", "chars", "held_out", "lanes", "eval_lanes", "batch_steps"]
    for name in [*positive, "segment_length", "hidden_size", "embedding_size"]:
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: argument {flag}: expected a positive integer, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"error: argument --threads: expected a positive integer, got {args.threads}")
    if not 0 <= args.seed < 2**32:
        raise SystemExit(f"error: argument --seed: expected 0 to 4294967295 (numpy's seeds), got {args.seed}")
    if not args.lr > 0:
        raise SystemExit(f"error: argument --lr: expected a positive learning rate, got {args.lr}")
    if args.stride is not None and not 1 <= args.stride <= args.segment_length:
        raise SystemExit(
            f"error: argument --stride: expected 1 to --segment-length ({args.segment_length}), got {args.stride}"
        )
    if not 0 <= args.burn_in < args.batch_steps:
        raise SystemExit(
            f"error: argument --burn-in: expected 0 to --batch-steps - 1 ({args.batch_steps - 1}), got {args.burn_in}"
        )
    if args.dynamic_lr is not None and not (args.dynamic_lr > 0 and math.isfinite(args.dynamic_lr)):
        raise SystemExit(f"error: argument --dynamic-lr: expected a positive step size, got {args.dynamic_lr}")
    if not (args.dynamic_decay >= 0 and math.isfinite(args.dynamic_decay)):
        raise SystemExit(f"error: argument --dynamic-decay: expected a number >= 0, got {args.dynamic_decay}")
    if args.sample < 0:
        raise SystemExit(f"error: argument --sample: expected a number of characters >= 0, got {args.sample}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise SystemExit(f"error: argument --temperature: expected a positive temperature, got {args.temperature}")
    if args.sample and not args.prompt:
        raise SystemExit("error: argument --prompt: expected at least one character for the model to continue")
    if args.probe is not None:
        if args.probe < 1:
            raise SystemExit(f"error: argument --probe: expected a positive number of batches, got {args.probe}")
        clash = (
            "--stride"
            if args.stride is not None
            else "--burn-in"
            if args.burn_in
            else "--random-lengths"
            if args.random_lengths != "off"
            else None
        )
        if clash is not None:
            raise SystemExit(
                f"error: argument --probe: not with {clash} (the probe measures plain segments); leave one out"
            )
    if args.held_out * 10 > args.chars:
        raise SystemExit(
            f"error: argument --held-out: expected at most a tenth of --chars ({args.chars // 10:,}), got"
            f" {args.held_out:,}; pass a smaller --held-out"
        )
    # every lane holds at least one batch (a part of n characters gives n - 1 input/target pairs)
    for part, name, flag, lanes, lanes_flag in [
        (args.chars - args.held_out, "training", "--chars", args.lanes, "--lanes"),
        (args.held_out, "held-out", "--held-out", args.eval_lanes, "--eval-lanes"),
    ]:
        if (part - 1) // lanes < args.batch_steps:
            raise SystemExit(
                f"error: argument --batch-steps: expected at most the {name} characters per lane"
                f" ({(part - 1) // lanes:,} with {lanes_flag} {lanes}), got {args.batch_steps}; pass a smaller"
                f" --batch-steps, fewer {lanes_flag} or a larger {flag}"
            )
    devices = _devices(args.devices)
    if isinstance(devices, int) and devices > 1 and (args.lanes % devices or args.eval_lanes % devices):
        raise SystemExit(
            f"error: argument --devices: expected a number that divides --lanes ({args.lanes}) and --eval-lanes"
            f" ({args.eval_lanes}), got {devices}; every process streams its own lanes"
        )
    if args.resume is None:
        if args.checkpoint_dir is not None and (args.checkpoint_dir / "last.ckpt").exists():
            raise SystemExit(
                f"error: argument --checkpoint-dir: {args.checkpoint_dir} already holds last.ckpt, which a new run"
                " would overwrite; pass --resume last to go on from it, or another --checkpoint-dir (or delete the"
                " file) to start a new run"
            )
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


def _check_checkpoint(args: argparse.Namespace, path: str) -> int:
    """Refuse a flag that differs from the run saved in the checkpoint at ``path``; return the checkpoint's step."""
    try:
        # the demo's checkpoints hold only tensors, numbers, strings and containers of them
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        step = int(checkpoint["global_step"])
    except Exception as error:  # any reason why the file is not a checkpoint
        raise SystemExit(
            f"error: argument --resume: cannot read {path} as a checkpoint ({type(error).__name__}:"
            f" {str(error).strip().splitlines()[0][:80] if str(error).strip() else 'no message'}); pass a .ckpt file"
            " saved by the demo, or `last`"
        ) from None
    saved = checkpoint.get(FLAGS_KEY)
    if not isinstance(saved, dict):  # saved before the demo kept its flags: the model's, which Lightning keeps
        saved = dict(checkpoint.get("hyper_parameters") or {})
    for name, value in resume_flags(args).items():
        if name in saved and saved[name] != value:
            flag = "--" + name.replace("_", "-")
            fix = f"pass {flag} {saved[name]}" if saved[name] is not None else f"leave out {flag}"
            raise SystemExit(
                f"error: argument {flag}: expected the value the checkpoint {path} was trained with"
                f" ({_shown(saved[name])}), got {_shown(value)}; {fix} to resume it, or leave out --resume to"
                " start a new run"
            )
    return step


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def resume_command(args: argparse.Namespace) -> str:
    """The command that resumes this run from ``last.ckpt`` in its ``--checkpoint-dir``: its flags, ``--resume last``.

    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser)
    >>> resume_command(parser.parse_args(["--lanes", "8", "--checkpoint-dir", "runs/a b"]))
    "lightning-tbptt demo --lanes 8 --checkpoint-dir 'runs/a b' --resume last"
    """
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["lightning-tbptt", "demo"]
    for name, default in vars(parser.parse_args([])).items():
        value = getattr(args, name)
        if name != "resume" and value != default:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join([*words, "--resume", "last"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and validate as the flags say, print the report and return its numbers.

    Raises:
        SystemExit: With status 130 where Ctrl-C stopped the run, after printing how to resume it; with the message
            ``"error: argument --flag: ..."`` for a refused flag, before anything runs (the command prints it as
            ``lightning-tbptt demo: error: argument --flag: ...`` and exits with status 2).
        TBPTTError: The library's, where it refuses the run (the command prints it on one line too).
    """
    resume = _check(args)
    resumed_step = None if resume is None else _check_checkpoint(args, resume)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with tempfile.TemporaryDirectory(prefix="lightning-tbptt-demo-") as folder:
            return _run(args, resume, resumed_step, Path(folder))
    finally:
        # Lightning 2.4 and later ignore Ctrl-C after handling a `KeyboardInterrupt`: leave the process as it was
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)


def _run(args: argparse.Namespace, resume: str | None, resumed_step: int | None, folder: Path) -> dict[str, Any]:
    # Lightning before 2.3 warns of every resume in the middle of an epoch, whatever the dataloader; the callback and
    # `LaneDataModule` resume exactly there (tested), so the warning is wrong here
    warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before the epoch ended\\. This")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.* is deprecated")  # Lightning on newer torch
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed)
    started = time.perf_counter()

    train_path, val_path = folder / "train.npy", folder / "val.npy"
    corpus, num_files, root = stdlib_sources(args.chars)
    entropy = unigram_entropy(corpus)
    split = len(corpus) - args.held_out
    np.save(train_path, corpus[:split])  # read back as memory maps, a batch at a time
    np.save(val_path, corpus[split:])
    del corpus
    data = LaneDataModule(
        str(train_path),
        str(val_path),
        lanes=args.lanes,
        steps=args.batch_steps,
        eval_lanes=args.eval_lanes,
        target_shift=1,
    )
    lane_length = (split - 1) // args.lanes  # as `LaneStream` lays out one sequence of input/target pairs
    tbptt = TBPTTCallback(
        segment_length=args.segment_length,
        streaming=True,
        resets="starts",
        stride=args.stride,
        burn_in=args.burn_in,
        probe_every=args.probe,
        random_lengths=None if args.random_lengths == "off" else RandomLengths(args.random_lengths, seed=args.seed),
    )
    max_steps = end_of_batch(args.max_steps, lane_length, args.batch_steps, tbptt)
    model = CharLM(args.embedding_size, args.hidden_size, args.lr)
    history = History()
    bar = StepsProgressBar(
        args.batch_steps,
        tbptt,
        refresh_rate=1 if sys.stdout.isatty() else 8,  # fewer lines in a log file
    )
    save = None
    if args.checkpoint_dir is not None:
        last = args.checkpoint_dir / "last.ckpt"
        save = SaveLast(args.checkpoint_dir, resume_flags(args), resumed_step if resume == str(last) else None)
    ctrl_c = CtrlC(save)
    probes = Probes(tbptt)
    callbacks: list[pl.Callback] = [tbptt, history, bar, probes, *([save] if save else []), ctrl_c]
    trainer = _trainer(
        args,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        callbacks=callbacks,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    say = trainer.print
    say(
        f"corpus: {split + args.held_out:,} characters of source from {num_files} files of the Python"
        f" {sys.version_info.major}.{sys.version_info.minor} standard library ({root})"
    )
    say(
        f"training: {split:,} characters as {args.lanes} lanes of {split // args.lanes:,}, {args.batch_steps} per"
        f" batch; held out (the end of the corpus): {args.held_out:,} characters as {args.eval_lanes} lanes"
    )
    window = f", a window every {args.stride}" if args.stride else ""
    say(
        f"model: LSTM {args.hidden_size} units, {sum(p.numel() for p in model.parameters()):,} parameters; TBPTT"
        f" segments of {args.segment_length} characters{window}, state carried across batches"
    )
    if max_steps != args.max_steps:
        say(
            f"--max-steps {args.max_steps} ends inside a batch: training runs to step {max_steps}, the end of that"
            " batch, where a checkpoint resumes exactly"
        )
    if resumed_step is not None and resumed_step >= max_steps:
        say(
            f"checkpoint: {resume} already holds step {resumed_step}, at or beyond --max-steps {args.max_steps}:"
            f" nothing to train; its results follow (pass a --max-steps above {resumed_step} to train on)"
        )

    if resume is None:
        history.before = trainer.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
        say(f"held-out bits per character before training: {history.before:.3f}")
    # Lightning 2.6 and later take `weights_only` (left out, torch 2.4 and 2.5 warn that it will change)
    options = {"weights_only": True} if resume and "weights_only" in inspect.signature(trainer.fit).parameters else {}
    try:
        trainer.fit(model, datamodule=data, ckpt_path=resume, **options)
    except Stopped:
        pass
    except SystemExit:
        if ctrl_c.interrupted_at is None:
            raise  # Lightning 2.4 and later exit after handling a KeyboardInterrupt; earlier releases return
    if ctrl_c.stopped_at is not None or ctrl_c.interrupted_at is not None:
        _report_table(say, history.before, history.rows)
        say(_stop_message(args, ctrl_c))
        raise SystemExit(130)  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
    rows = list(history.rows)
    if not rows or rows[-1][0] != trainer.global_step:
        final = trainer.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
        rows.append((trainer.global_step, history.characters, final))
    dynamic = None if args.dynamic_eval == "off" else dynamic_evaluation(model, data, args, train_path)
    seconds = time.perf_counter() - started
    peak_mib = _peak_rss_mib()

    before, after = history.before, rows[-1][2]
    _report_table(say, before, rows)
    if args.probe is not None:
        _probe_report(say, probes.results, seconds)
    say(f"unigram entropy of the corpus: {entropy:.3f} bits per character")
    first = before if before is not None else rows[0][2]
    below = (
        f" below the unigram entropy {entropy:.3f} by {entropy - after:.3f}"
        if after < entropy
        else f" NOT below the unigram entropy {entropy:.3f}"
    )
    say(
        f"result: held-out {after:.3f} bits per character after {trainer.global_step} steps"
        f" ({'improved from' if after < first else 'NOT improved from'} {first:.3f});{below}"
    )
    if dynamic is not None:
        decay = f", decay {args.dynamic_decay:g}" if args.dynamic_decay else ""
        say(
            f"dynamic evaluation ({args.dynamic_eval}, lr {dynamic_lr(args):g}{decay}):"
            f" held-out {dynamic:.3f} bits per character, {100 * (after - dynamic) / after:.1f} % below the static"
            f" {after:.3f} (each segment scored before the weights adapt on it; the trained weights are unchanged)"
        )
    say(f"peak memory: {peak_mib:,.0f} MiB resident (the corpus is memory-mapped and read a batch at a time)")
    if trainer.strategy.root_device.type == "cuda":
        cuda_mib = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20
        say(f"peak GPU memory: {cuda_mib:,.0f} MiB allocated (one segment of a batch on the device at a time)")
    say(f"time: {seconds:.0f} s")
    if args.checkpoint_dir is not None:
        say(
            f"checkpoint: {args.checkpoint_dir / 'last.ckpt'} (step {trainer.global_step}); go on with --resume last"
            " and a larger --max-steps"
        )
    text = None
    if args.sample:
        text = sample(model, args.prompt, args.sample, args.temperature, args.seed)
        say(f"\nsample: {args.sample} characters after {args.prompt!r}, temperature {args.temperature}:")
        say(args.prompt + text)
    trained = bar.trained_batches()
    return {
        "before": before,
        "history": rows,
        "after": after,
        "unigram_entropy": entropy,
        "global_step": trainer.global_step,
        "batches": None if trained is None else trained[0],
        "planned_batches": None if trained is None else trained[1],
        "peak_mib": peak_mib,
        "seconds": seconds,
        "probes": probes.results,
        "sample": text,
        "dynamic": dynamic,
    }


def dynamic_lr(args: argparse.Namespace) -> float:
    """The step size of ``--dynamic-eval``: ``--dynamic-lr``, or the rule's default."""
    if args.dynamic_lr is not None:
        return float(args.dynamic_lr)
    return 1e-3 if args.dynamic_eval == "rms" else 0.3


def dynamic_evaluation(model: CharLM, data: LaneDataModule, args: argparse.Namespace, train_path: Path) -> float:
    """The held-out bits per character with dynamic evaluation (``--dynamic-eval``); the model is left as it was.

    The ``rms`` rule's gradient statistics come from the first two training batches.
    """

    def statistics() -> Any:
        return LaneDataModule(
            str(train_path), lanes=args.lanes, steps=args.batch_steps, target_shift=1
        ).train_dataloader()

    settings = DynamicEvaluation(
        lr=dynamic_lr(args),
        rule=args.dynamic_eval,
        decay=args.dynamic_decay,
        statistics=statistics,
        statistics_batches=2,
    )
    callback = TBPTTCallback(args.segment_length, streaming=True, resets="starts", dynamic_eval=settings)
    trainer = _trainer(
        args,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    bpc: float = trainer.validate(model, datamodule=data, verbose=False)[0]["val_bpc"]
    return bpc


def sample(model: CharLM, prompt: str, count: int, temperature: float, seed: int) -> str:
    """``count`` characters generated after ``prompt``, one at a time, the LSTM's state carried by a ``Stepper``.

    The model is called on the prompt, then on each sampled character alone (its ``forward`` takes no state); the
    characters are drawn from the softmax of the logits divided by ``temperature``, from a generator seeded with
    ``seed``. Bytes that do not decode as UTF-8 are shown as U+FFFD, control characters other than newline and tab as
    Python escapes (a bell as the four characters of its escape), never sent to the terminal as they are.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([list(prompt.encode())], device=device)
    drawn: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Stepper(model) as step:
            logits = step(tokens)[:, -1]
            for _ in range(count):
                token = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1, generator=generator)
                drawn.append(int(token))
                logits = step(token)[:, -1]
    finally:
        model.train(was_training)
    text = bytes(drawn).decode("utf-8", errors="replace")
    # control characters (a bell, a terminal escape) shown as escapes rather than sent to the terminal
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _report_table(say: Any, before: float | None, rows: list[tuple[int, int, float]]) -> None:
    say("\nheld-out bits per character:")
    say(f"  {'optimizer step':>14}  {'characters read':>15}  {'bits/char':>9}")
    if before is not None:
        say(f"  {0:>14}  {0:>15,}  {before:>9.3f}")
    for step, characters, bpc in rows:
        say(f"  {step:>14}  {characters:>15,}  {bpc:>9.3f}")


def _probe_report(say: Any, results: list[Any], seconds: float) -> None:
    if not results:
        say("\ntruncation probe: no batch was probed")
        return
    last = results[-1]
    say(
        f"\ntruncation probe: relative bias of the truncated gradient (share of the exact gradient the cuts drop),"
        f" measured on the first {last.span} characters of a batch, tolerance {last.tolerance}:"
    )
    lengths = sorted(last.biases)
    say(f"  {'optimizer step':>14}  " + "  ".join(f"{f'k={k}':>7}" for k in lengths) + f"  {'shortest':>8}  seconds")
    for result in results:
        biases = "  ".join(f"{result.biases[k]:>7.3f}" if k in result.biases else f"{'-':>7}" for k in lengths)
        shortest = "none" if result.suggested is None else str(result.suggested)
        say(f"  {result.global_step:>14}  {biases}  {shortest:>8}  {result.seconds:>7.2f}")
    bias = "not measured" if last.bias is None else f"{last.bias:.3f}"
    suggestion = (
        f"the shortest segment length below {last.tolerance} is {last.suggested}"
        if last.suggested is not None
        else f"no length shorter than {last.span} is below {last.tolerance} (raise the horizon to look further)"
    )
    spent = sum(result.seconds for result in results)
    say(
        f"probe: at step {last.global_step}, segments of {last.segment_length} characters drop {bias} of the gradient;"
        f" {suggestion}; {len(results)} probe(s) took {spent:.1f} s of the run's {seconds:.0f} s"
    )


def _stop_message(args: argparse.Namespace, ctrl_c: CtrlC) -> str:
    """What Ctrl-C left behind and the command that goes on from it."""
    save = ctrl_c.save
    if ctrl_c.stopped_at is not None:
        stopped = f"stopped by Ctrl-C at step {ctrl_c.stopped_at}, between two batches"
        if save is None:
            return f"{stopped}; nothing saved: no --checkpoint-dir was given (pass one to be able to resume a run)"
        return f"{stopped}; saved {save.path} (step {save.saved_step}); go on with:\n  {resume_command(args)}"
    stopped = (
        f"stopped at once by a second Ctrl-C (KeyboardInterrupt) at step {ctrl_c.interrupted_at}, inside a batch;"
        " nothing saved (a checkpoint from inside a batch does not resume exactly)"
    )
    if save is None:
        return f"{stopped}; no --checkpoint-dir was given"
    if save.saved_step is None:
        return f"{stopped}; this run saved no checkpoint before it: run the same command again"
    return f"{stopped}; {save.path} holds step {save.saved_step}; go on from there with:\n  {resume_command(args)}"


def _devices(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def _trainer(args: argparse.Namespace, **settings: Any) -> pl.Trainer:
    """A ``Trainer`` on the device the flags ask for; Lightning's refusal of those flags ends the demo in one line."""
    device = {"accelerator": args.accelerator, "devices": _devices(args.devices), "precision": args.precision}
    try:
        return pl.Trainer(**device, **settings)
    except Exception as error:  # Lightning's own: ValueError, TypeError, MisconfigurationException, a missing package
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SystemExit(
            f"error: argument --accelerator/--devices/--precision: Lightning refused --accelerator {args.accelerator}"
            f" --devices {args.devices} --precision {args.precision}: {reason}"
        ) from error


def _peak_rss_mib() -> float:
    """Peak resident set size of this process (NaN where the platform does not tell)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
