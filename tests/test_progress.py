"""The progress bar shows the running segment of a long batch (TQDM and Rich), and reverts at the batch's end."""

import itertools
import time
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar

from lightning_tbptt import TBPTTCallback, progress
from tests.helpers import SequenceRegressor, make_loader, make_trainer

SEGMENT = 6  # sequences of 23 steps: 4 segments per batch


def description(trainer: pl.Trainer, stage: str) -> str:
    bar: Any = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar):
        return getattr(bar, f"{stage}_progress_bar").desc
    assert isinstance(bar, RichProgressBar)
    assert bar.progress is not None
    return bar.progress.tasks[getattr(bar, f"{stage}_progress_bar_id")].description


class Watched(SequenceRegressor):
    """Records the progress bar's description in every segment and at the end of every batch."""

    def __init__(self) -> None:
        super().__init__(log=False)
        self.seen: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(description(self.trainer, "train"))
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen.append(description(self.trainer, "val"))

    def on_train_batch_end(self, *args: Any) -> None:
        self.seen.append("end: " + description(self.trainer, "train"))


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_the_bar_shows_the_running_segment_and_reverts_after_the_batch(tmp_path, bar):
    pytest.importorskip("rich")
    model = Watched().double()
    trainer = make_trainer(
        tmp_path,
        [TBPTTCallback(SEGMENT), bar()],
        enable_progress_bar=True,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, make_loader(), make_loader())
    before = model.seen[4].removeprefix("end: ")  # as Lightning set it: "Epoch 0: " (tqdm), "Epoch 0/0 " (Rich)
    assert "Epoch 0" in before
    suffix = ": " if bar is TQDMProgressBar else ""  # tqdm keeps its description with ": "
    segments = [f"{before.removesuffix(suffix).rstrip()} (segment {i}/4){suffix}" for i in range(1, 5)]
    training = [*segments, f"end: {before}"] * 2
    assert model.seen[:10] == training
    validation = model.seen[10:]
    assert len(validation) == 4 and all(f"(segment {i}/4)" in text for i, text in enumerate(validation, 1))


def fit_counting_redraws(tmp_path: Any, terminal: bool, refresh_rate: int = 1) -> tuple[list[float], float, Any]:
    """Fit 2 batches of 23 one-step segments; return when the segment display redrew the bar, and the fit's time."""
    model = SequenceRegressor(log=False).double()
    bar = TQDMProgressBar(refresh_rate=refresh_rate)
    trainer = make_trainer(tmp_path, [TBPTTCallback(1), bar], enable_progress_bar=True, limit_train_batches=2)
    redraws: list[float] = []

    class Counting(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            tqdm = bar.train_progress_bar
            tqdm.fp.isatty = lambda: terminal
            original = tqdm.set_description

            def set_description(text: str, refresh: bool = True) -> None:
                if refresh:
                    redraws.append(time.monotonic())
                original(text, refresh=refresh)

            tqdm.set_description = set_description

    trainer.callbacks.append(Counting())
    started = time.monotonic()
    trainer.fit(model, make_loader())
    return redraws, time.monotonic() - started, trainer


def test_a_terminal_bar_is_redrawn_at_most_every_refresh_interval(tmp_path):
    redraws, elapsed, trainer = fit_counting_redraws(tmp_path, terminal=True)
    assert trainer.global_step == 46
    assert 1 <= len(redraws) <= 1 + elapsed / progress.REFRESH_SECONDS
    assert len(redraws) < 46
    gaps = [b - a for a, b in itertools.pairwise(redraws)]
    assert all(gap >= progress.REFRESH_SECONDS * 0.9 for gap in gaps)


@pytest.mark.parametrize(("terminal", "refresh_rate"), [(False, 1), (True, 1000)])
def test_a_bar_writing_to_a_log_or_redrawn_rarely_gets_no_extra_redraw(tmp_path, terminal, refresh_rate):
    redraws, _, trainer = fit_counting_redraws(tmp_path, terminal=terminal, refresh_rate=refresh_rate)
    assert trainer.global_step == 46
    assert redraws == []


@pytest.mark.parametrize("bar", [TQDMProgressBar, RichProgressBar])
def test_with_exact_gradients_the_bar_shows_both_passes(tmp_path, bar):
    pytest.importorskip("rich")
    model = Watched().double()
    callbacks = [TBPTTCallback(SEGMENT, exact=True), bar()]
    trainer = make_trainer(tmp_path, callbacks, enable_progress_bar=True, limit_train_batches=1)
    trainer.fit(model, make_loader())
    before = model.seen[-1].removeprefix("end: ")
    suffix = ": " if bar is TQDMProgressBar else ""
    base = before.removesuffix(suffix).rstrip()
    first = [f"{base} (segment {i}/4){suffix}" for i in range(1, 5)]
    again = [f"{base} (segment {i}/4, recomputing){suffix}" for i in range(4, 0, -1)]
    assert model.seen[:-1] == first + again
