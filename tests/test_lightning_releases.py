"""Behaviours of recent Lightning releases that touch checkpoints and validation: exact resume stays exact."""

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from packaging.version import Version
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_tbptt import LaneDataModule, TBPTTCallback
from tests.helpers import make_trainer, parameters_equal
from tests.test_resume import SEGMENT, STEPS, StreamRegressor


class ValidatedRegressor(StreamRegressor):
    """Logs a validation loss; counts the validation runs and where in the training epoch they came."""

    def __init__(self) -> None:
        super().__init__()
        self.validated_after: list[int] = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        out, _ = self.rnn(batch["input"].unsqueeze(-1))
        self.log("val_loss", F.mse_loss(self.head(out).squeeze(-1), batch["target"]))

    def on_validation_start(self) -> None:
        if not self.trainer.sanity_checking:
            self.validated_after.append(self.trainer.fit_loop.epoch_loop.batch_idx)


def stream_data(validate: bool = True) -> LaneDataModule:
    generator = np.random.default_rng(0)
    sequences = [np.cumsum(generator.normal(size=n)) / 5 for n in (130, 97, 60)]
    val = [np.cumsum(generator.normal(size=n)) / 5 for n in (50, 41)] if validate else None
    return LaneDataModule(sequences, val, lanes=4, steps=STEPS, eval_lanes=2, target_shift=1)


def fit(root: Path, callbacks: list[Any], ckpt_path: Path | None = None, validate: bool = True, **kwargs: Any) -> Any:
    """Two epochs of 6 batches of 3 segments (18 optimizer steps per epoch), streaming the lanes."""
    torch.manual_seed(0)
    model = ValidatedRegressor().double()
    streaming = TBPTTCallback(SEGMENT, streaming=True, resets="starts")
    trainer = make_trainer(root, [streaming, *callbacks], **{"max_epochs": 2, "num_sanity_val_steps": 0, **kwargs})
    trainer.fit(model, datamodule=stream_data(validate), ckpt_path=ckpt_path)
    return model, trainer


class RecordsSaves(pl.Callback):
    """Records, for every checkpoint, its global step and whether it was saved while validation ran."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, bool]] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.saves.append((trainer.global_step, trainer.validating))


@pytest.mark.skipif(
    Version(pl.__version__) < Version("2.5.5"), reason="Lightning 2.5.5 defers these saves until validation ends"
)
@pytest.mark.parametrize(
    "trigger", [{"every_n_train_steps": 3}, {"train_time_interval": timedelta(0)}], ids=["steps", "time"]
)
def test_a_step_or_time_triggered_checkpoint_saved_after_validation_resumes_exactly(tmp_path, trigger):
    saves = RecordsSaves()
    checkpoints = ModelCheckpoint(tmp_path, "{step}", monitor="val_loss", save_top_k=-1, **trigger)
    model, _ = fit(tmp_path, [checkpoints, saves], enable_checkpointing=True, val_check_interval=2)
    after_validation = [step for step, validating in saves.saves if validating and step < 36]
    assert [step for step in after_validation if step % 18], f"none saved after a validation mid-epoch: {saves.saves}"
    assert 18 in after_validation, "the end of the first epoch, saved after its validation"
    for step in after_validation:
        path = tmp_path / f"step={step}.ckpt"
        state = torch.load(path, weights_only=True)["callbacks"]["TBPTTCallback"]
        assert state["lanes"] == 4, "the lanes of the training stream, not the 2 of validation"
        assert state["carried"]["rnn"][0].shape == (1, 4, 8)
        resumed, _ = fit(tmp_path / path.stem, [], path, val_check_interval=2)
        assert parameters_equal(resumed, model, rtol=0, atol=1e-12), path.name


@pytest.mark.skipif(
    Version(pl.__version__) < Version("2.6.0"), reason="Lightning 2.6.0 added time-based `val_check_interval`"
)
@pytest.mark.parametrize("interval", [timedelta(microseconds=1), {"microseconds": 1}], ids=["timedelta", "dict"])
def test_time_based_validation_leaves_the_training_stream_alone(tmp_path, interval):
    without, _ = fit(tmp_path, [], validate=False)
    model, _ = fit(tmp_path, [], val_check_interval=interval)
    assert len(model.validated_after) > 2, "validation ran in the middle of the epochs"
    assert parameters_equal(model, without, rtol=0, atol=0)


def test_validation_in_the_middle_of_an_epoch_leaves_the_training_stream_alone(tmp_path):
    """The same as the time-based check, with a batch count: every Lightning release validates this way."""
    without, _ = fit(tmp_path, [], validate=False)
    model, _ = fit(tmp_path, [], val_check_interval=2)
    assert model.validated_after == [1, 3, 5, 1, 3, 5]
    assert parameters_equal(model, without, rtol=0, atol=0)


@pytest.mark.parametrize("accumulate", [1, 2], ids=["stepping", "accumulating"])
def test_every_checkpoint_of_a_streaming_fit_loads_with_weights_only(tmp_path, accumulate):
    # after every batch: with accumulation, some end in the middle of one (gradients pending)
    checkpoints = ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1, save_last=True)
    fit(tmp_path, [checkpoints], enable_checkpointing=True, val_check_interval=2, accumulate_grad_batches=accumulate)
    paths = sorted(tmp_path.glob("*.ckpt"))
    assert len(paths) == 2 * 6 + 1, "after every batch, and `last.ckpt`"
    states = [torch.load(path, weights_only=True)["callbacks"]["TBPTTCallback"] for path in paths]
    assert any(state["carried"] for state in states)
    assert any("gradients" in state for state in states) == (accumulate > 1)
