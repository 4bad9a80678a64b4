"""What reaches the loggers: one row per optimizer step (``log_every="step"``) or per batch (``"batch"``)."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import TBPTTCallback
from tests.helpers import make_trainer
from tests.test_counters import RecordingLogger

SEGMENT, SEGMENTS, BATCHES = 5, 4, 3


class PerStep(LightningModule):
    """A model without state: a TBPTT segment and a batch holding just that segment train it alike."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self.layer(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES, 4, length, 3, generator=generator, dtype=torch.float64)
    return [(b, b.sum(-1, keepdim=True)) for b in x]


def cut(whole: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch's segments as batches of their own, in order."""
    return [
        (x[:, start : start + SEGMENT], y[:, start : start + SEGMENT])
        for x, y in whole
        for start in range(0, x.shape[1], SEGMENT)
    ]


def fit(tmp_path: Any, data: list[Any], callbacks: list[Any], val_every: int, **kwargs: Any) -> tuple[Any, Any]:
    torch.manual_seed(0)
    model = PerStep().double()
    logger = RecordingLogger()
    val = DataLoader(batches(SEGMENT)[:1], batch_size=None)
    trainer = make_trainer(
        tmp_path, callbacks, logger=logger, val_check_interval=val_every, num_sanity_val_steps=0, **kwargs
    )
    trainer.fit(model, DataLoader(data, batch_size=None), val)
    return model, logger.records


@pytest.mark.parametrize("every", [1, 3])
def test_a_row_per_optimizer_step_equals_lightning_with_one_segment_per_batch(tmp_path, every):
    whole = batches(SEGMENT * SEGMENTS)
    model, records = fit(tmp_path, whole, [TBPTTCallback(SEGMENT)], val_every=1, log_every_n_steps=every)
    plain, expected = fit(tmp_path, cut(whole), [], val_every=SEGMENTS, log_every_n_steps=every)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters(), strict=True))
    assert [step for step, _ in records] == [step for step, _ in expected]
    for (_, row), (_, plain_row) in zip(records, expected, strict=True):
        assert row == pytest.approx(plain_row)
    steps = [step for step, row in records if "train_loss_step" in row]
    assert steps == [s for s in range(BATCHES * SEGMENTS) if (s + 1) % every == 0]
    assert len([row for _, row in records if "val_loss" in row]) == BATCHES


def test_a_row_per_batch_as_lightning_does(tmp_path):
    whole = batches(SEGMENT * SEGMENTS)
    _, records = fit(tmp_path, whole, [TBPTTCallback(SEGMENT, log_every="batch")], val_every=1, log_every_n_steps=1)
    assert [step for step, row in records if "train_loss_step" in row] == list(range(BATCHES))
    assert [step for step, row in records if "val_loss" in row] == list(range(BATCHES))


def test_values_logged_at_batch_end_reach_the_row_of_the_batchs_last_step(tmp_path):
    class BatchEndLogging(PerStep):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.log("batch_end", float(batch_idx))

    logger = RecordingLogger()
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT)], logger=logger, log_every_n_steps=1)
    trainer.fit(BatchEndLogging().double(), DataLoader(batches(SEGMENT * SEGMENTS), batch_size=None))
    rows = [(step, row.get("batch_end")) for step, row in logger.records if "train_loss_step" in row]
    last_steps = [(b + 1) * SEGMENTS - 1 for b in range(BATCHES)]
    assert [step for step, value in rows if value is not None and step in last_steps] == last_steps
    assert [value for step, value in rows if step in last_steps] == [0.0, 1.0, 2.0]


def test_rows_when_max_steps_stops_inside_a_batch_equal_lightnings(tmp_path):
    whole = batches(SEGMENT * SEGMENTS)
    settings = {"log_every_n_steps": 5, "max_steps": 7, "max_epochs": -1}
    _, records = fit(tmp_path, whole, [TBPTTCallback(SEGMENT)], val_every=1, **settings)
    _, expected = fit(tmp_path, cut(whole), [], val_every=SEGMENTS, **settings)
    assert [step for step, row in records if "train_loss_step" in row] == [4]

    # (the fit with TBPTT validates after the batch that `max_steps` cut, the other one does not: rows without it)
    def training_rows(rows: list[Any]) -> list[Any]:
        return [(step, sorted(row)) for step, row in rows if "val_loss" not in row]

    assert training_rows(records) == training_rows(expected)
