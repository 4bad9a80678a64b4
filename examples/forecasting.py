"""Forecasting one long multichannel sensor signal with an LSTM, streamed in lanes with its state carried.

A recording of several sensor channels at 100 Hz (generated here with a fixed seed: sums of sinusoids mixed across
channels, a slow drift and measurement noise) is far too long for one batch. Its first part is cut into ``--lanes``
contiguous lanes that a :class:`~lightning_tbptt.LaneDataModule` streams batch by batch, and
``TBPTTCallback(streaming=True)`` carries each lane's LSTM state from segment to segment and from batch to batch, so
the model sees the recording as one continuous stream while backpropagating through one segment at a time. The model
predicts every channel ``--horizon`` steps ahead; nothing in it knows about segments or streams.

The held-out tail of the recording (the last ``--val-fraction``) is validated as one stream too, segment by segment,
from a zero state. Its first ``--warmup`` steps, where the state is still starting up, are left out of the scores by a
mask given to :class:`~lightning_tbptt.MaskedMetric` (a masked MAE and MSE), for the model and for the baseline it
must beat: persistence, which forecasts that every channel keeps its last value. The script exits with an error if
the trained model does not beat persistence on the held-out tail.

    python examples/forecasting.py                        # 10 minutes of signal, about 80 s on 2 CPU cores
    python examples/forecasting.py --minutes 2 --epochs 5  # a quick look
"""

import argparse
import logging
import math
import sys
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from lightning_tbptt import LaneDataModule, MaskedMetric, TBPTTCallback, current_segment

# The small setting CI runs this script with (a few seconds on one core).
CI_ARGV = ["--minutes=1", "--epochs=3", "--hidden-size=16", "--lanes=8", "--steps=300"]

RATE = 100  # samples per second


def make_signal(minutes: float, channels: int, noise: float, seed: int) -> np.ndarray:
    """A ``(minutes * 60 * RATE, channels)`` float32 recording: mixed sinusoids, a slow drift and noise."""
    rng = np.random.default_rng(seed)
    steps = int(minutes * 60 * RATE)
    t = np.arange(steps) / RATE
    # a few latent oscillations between 0.1 and 1.5 Hz (periods of 67 to 1000 samples), each drifting in phase
    sources = []
    for _ in range(channels + 2):
        frequency = rng.uniform(0.1, 1.5)
        wobble = np.cumsum(rng.normal(0, 0.002, steps))  # a slow random walk of the phase
        sources.append(np.sin(2 * np.pi * frequency * t + rng.uniform(0, 2 * np.pi) + wobble))
    mixing = rng.normal(0, 1, (channels, len(sources))) / math.sqrt(len(sources))
    signal = mixing @ np.stack(sources)  # every channel a mix of every source: the channels inform each other
    drift = np.cumsum(rng.normal(0, 0.01, (channels, steps)), axis=1)  # a slow random walk per channel ...
    kernel = np.ones(RATE) / RATE
    drift = np.stack([np.convolve(d, kernel, mode="same") for d in drift])  # ... smoothed over one second
    signal = signal + drift + rng.normal(0, noise, (channels, steps))
    return signal.T.astype(np.float32)


class Forecaster(pl.LightningModule):
    """An LSTM forecasting every channel ``horizon`` steps ahead, as the change from the current value.

    Written as for short sequences: the LSTM is called without a state, the loss is a plain mean over the batch it is
    given. The callback cuts batches into segments and carries the state.
    """

    def __init__(self, channels: int, hidden_size: int, lr: float, warmup: int, steps: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(channels, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, channels)
        self.lr, self.warmup, self.steps = lr, warmup, steps
        # masked metrics: only the steps the mask selects reach the wrapped torchmetrics metric
        self.val_mae, self.val_mse = MaskedMetric(MeanAbsoluteError()), MaskedMetric(MeanSquaredError())
        self.persistence_mae, self.persistence_mse = MaskedMetric(MeanAbsoluteError()), MaskedMetric(MeanSquaredError())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)  # no state argument: the callback gives the carried one
        return x + self.head(out)  # the forecast: the current value plus the predicted change

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.mse_loss(self(batch["input"]), batch["target"])
        self.log("train_mse", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y = batch["input"], batch["target"]
        segment = current_segment()  # which steps of the batch this segment holds
        # position of every step of the segment in the validation stream (its batches have `steps` steps each)
        position = batch_idx * self.steps + segment.start + torch.arange(segment.length, device=x.device)
        scored = (position >= self.warmup).expand(x.shape[0], -1)  # (B, T_seg): past the warm-up
        forecast = self(x)
        self.val_mae.update(forecast, y, mask=scored)
        self.val_mse.update(forecast, y, mask=scored)
        self.persistence_mae.update(x, y, mask=scored)  # the naive forecast: nothing changes
        self.persistence_mse.update(x, y, mask=scored)
        metrics = {"val_mae": self.val_mae, "val_mse": self.val_mse}
        metrics |= {"persistence_mae": self.persistence_mae, "persistence_mse": self.persistence_mse}
        self.log_dict(metrics, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the recording, at 100 Hz")
    parser.add_argument("--channels", type=int, default=4, help="sensor channels")
    parser.add_argument("--noise", type=float, default=0.05, help="standard deviation of the measurement noise")
    parser.add_argument("--horizon", type=int, default=20, help="forecast this many steps (1/100 s each) ahead")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="held-out tail of the recording")
    parser.add_argument("--lanes", type=int, default=16, help="lanes the training part is cut into (rows per batch)")
    parser.add_argument("--steps", type=int, default=500, help="time steps per batch and lane")
    parser.add_argument("--segment-length", type=int, default=50, help="TBPTT segment length (one optimizer step each)")
    parser.add_argument("--warmup", type=int, default=200, help="first held-out steps left out of the scores")
    parser.add_argument("--hidden-size", type=int, default=64, help="LSTM hidden size")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training stream")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the signal and of the weights")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning 2.6 on torch 2.13 (not about this script)
    warnings.filterwarnings("ignore", ".*IterableDataset.*__len__.*")

    signal = make_signal(args.minutes, args.channels, args.noise, args.seed)
    split = int(len(signal) * (1 - args.val_fraction))
    mean, std = signal[:split].mean(0), signal[:split].std(0)  # normalised with the training part's statistics
    signal = (signal - mean) / std
    train, held_out = signal[:split], signal[split:]
    print(
        f"signal: {len(signal):,} steps x {args.channels} channels ({len(signal) / RATE / 60:.1f} min at {RATE} Hz);"
        f" training {len(train):,} steps in {args.lanes} lanes, held-out tail {len(held_out):,} steps"
    )

    # Training: `lanes` contiguous lanes of the training part, `steps` steps of each per batch; each batch is a dict
    # {"input": (lanes, steps, C), "target": the same `horizon` steps later, "starts": where a lane starts anew}.
    # Validation: the held-out tail as one lane, streamed from a zero state.
    data = LaneDataModule(train, held_out, lanes=args.lanes, steps=args.steps, eval_lanes=1, target_shift=args.horizon)
    callback = TBPTTCallback(segment_length=args.segment_length, streaming=True, resets="starts")
    torch.manual_seed(args.seed)
    model = Forecaster(args.channels, args.hidden_size, args.lr, args.warmup, args.steps)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=[callback],
        gradient_clip_val=1.0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        # validation under no_grad rather than inference mode: metric states reset by `validate` in inference mode
        # could not be updated in place by the validation runs inside `fit` (a Lightning/torchmetrics limitation)
        inference_mode=False,
    )

    (before,) = trainer.validate(model, datamodule=data, verbose=False)
    print(f"untrained:   held-out MAE {before['val_mae']:.4f}  MSE {before['val_mse']:.4f}")
    began = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - began
    train_mse = float(trainer.callback_metrics["train_mse"])  # the last epoch's mean over every training step
    (after,) = trainer.validate(model, datamodule=data, verbose=False)
    print(
        f"trained:     held-out MAE {after['val_mae']:.4f}  MSE {after['val_mse']:.4f}"
        f"  ({trainer.global_step} optimizer steps in {seconds:.1f} s, last train MSE"
        f" {train_mse:.4f})"
    )
    print(f"persistence: held-out MAE {after['persistence_mae']:.4f}  MSE {after['persistence_mse']:.4f}")
    ratio = after["val_mse"] / after["persistence_mse"]
    print(f"the LSTM's held-out MSE is {ratio:.2f} x persistence's, {args.horizon} steps ahead")
    if not (after["val_mae"] < after["persistence_mae"] and after["val_mse"] < after["persistence_mse"]):
        sys.exit("FAILED: the trained model does not beat persistence on the held-out tail")


if __name__ == "__main__":
    main()
