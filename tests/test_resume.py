"""Checkpoints in streaming mode: resuming after any batch gives exactly the parameters of an uninterrupted run."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_tbptt import BatchError, ConfigurationError, LaneDataModule, TBPTTCallback
from tests.helpers import LR, MOMENTUM, make_trainer, parameters_equal

SEGMENT, STEPS, LANES = 5, 12, 4  # 3 segments (5, 5, 2) and so 3 optimizer steps per batch


class StreamRegressor(pl.LightningModule):
    """Predicts the next value of a stream; nothing about TBPTT or streaming appears in it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(1, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out, _ = self.rnn(batch["input"].unsqueeze(-1))
        return F.mse_loss(self.head(out).squeeze(-1), batch["target"])

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def stream_data(lanes: int = LANES) -> LaneDataModule:
    generator = np.random.default_rng(0)
    sequences = [np.cumsum(generator.normal(size=n)) / 5 for n in (130, 97, 60)]
    return LaneDataModule(sequences, lanes=lanes, steps=STEPS, target_shift=1)


def fit(tmp_path: Path, ckpt_path: Path | None = None, every: int = 0, lanes: int = LANES) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = StreamRegressor().double()
    callbacks: list[Any] = [TBPTTCallback(SEGMENT, streaming=True, resets="starts")]
    if every:
        callbacks.append(ModelCheckpoint(tmp_path, "{epoch}-{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, enable_checkpointing=bool(every))
    trainer.fit(model, datamodule=stream_data(lanes), ckpt_path=ckpt_path)
    return model, trainer


def checkpoint(tmp_path: Path, name: str) -> Path:
    (path,) = tmp_path.glob(f"{name}.ckpt")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, int]:
    directory = tmp_path_factory.mktemp("uninterrupted")
    model, trainer = fit(directory, every=6)  # a checkpoint after every second batch
    return model, directory, trainer.global_step


@pytest.mark.parametrize(
    "name", ["epoch=0-step=6", "epoch=0-step=12", "epoch=0-step=18", "epoch=1-step=24", "epoch=1-step=30"]
)
def test_resuming_mid_epoch_equals_the_uninterrupted_run(tmp_path, uninterrupted, name):
    model, directory, global_step = uninterrupted
    assert global_step == 2 * 6 * 3, "6 batches per epoch (71 steps per lane), 3 segments each"
    resumed, trainer = fit(tmp_path, ckpt_path=checkpoint(directory, name))
    assert trainer.global_step == global_step
    assert parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_resuming_without_the_carried_state_would_differ(tmp_path, uninterrupted):
    """Negative control: the carried state in the checkpoint is what makes the resumed run exact."""
    model, directory, _ = uninterrupted
    path = checkpoint(directory, "epoch=0-step=6")
    stripped = torch.load(path, weights_only=False)
    (key,) = [key for key in stripped["callbacks"] if "TBPTTCallback" in key]
    stripped["callbacks"][key]["carried"] = {}
    torch.save(stripped, tmp_path / "stripped.ckpt")
    resumed, _ = fit(tmp_path, ckpt_path=tmp_path / "stripped.ckpt")
    assert not parameters_equal(resumed, model, rtol=0, atol=1e-12)


def test_resuming_with_another_lane_layout(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    with pytest.raises(BatchError, match=r"the checkpoint carries the state of 4 lanes but the batch has 2 rows"):
        fit(tmp_path, ckpt_path=checkpoint(directory, "epoch=0-step=6"), lanes=2)


def test_resuming_with_another_streaming_setting(tmp_path, uninterrupted):
    _, directory, _ = uninterrupted
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT)], max_epochs=2)
    with pytest.raises(ConfigurationError, match=r"saved with `streaming=True`\. Resume with the same setting"):
        trainer.fit(StreamRegressor(), datamodule=stream_data(), ckpt_path=checkpoint(directory, "epoch=0-step=6"))
