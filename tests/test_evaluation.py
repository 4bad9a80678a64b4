"""Segmented validation, test and prediction, and moving one segment at a time to the device."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_tbptt import ConfigurationError, ModelError, TBPTTCallback, current_segment, masked_mean
from lightning_tbptt._lightning_internals import patched_loop_attributes
from lightning_tbptt.outputs import join_outputs
from lightning_tbptt.segment import Segment
from tests.helpers import (
    LENGTHS,
    SequenceRegressor,
    loader_of,
    make_loader,
    make_trainer,
    padded_batches,
    parameters_equal,
    reference_tbptt,
    twin,
)
from tests.test_streaming import SEGMENT, LaneRegressor, lane_batches, reference_lanes


class Evaluated(SequenceRegressor):
    """Validation, test and prediction steps written for whole sequences."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.eval_lengths: list[int] = []

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.eval_lengths.append(x.shape[1])
        loss = F.mse_loss(self(x), y)
        self.log("val_loss", loss)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("test_loss", loss)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        x, _ = batch
        out, (h, _) = self.rnn(x)
        return {"y": self.head(out), "last": h[-1], "segments": current_segment().count}


def whole_sequence_mse(model: Any, loader: Any) -> float:
    with torch.no_grad():
        errors = [((model(x) - y) ** 2).flatten() for x, y in loader]
    return torch.cat(errors).mean().item()


def test_predictions_equal_one_unsplit_forward_pass(tmp_path):
    torch.manual_seed(0)
    model = Evaluated(num_layers=2).double()
    loader = make_loader(length=43)  # 10 times longer than a segment, which the training batches never were
    predictions = make_trainer(tmp_path, [TBPTTCallback(4)]).predict(model, loader)
    for (x, _), predicted in zip(loader, predictions, strict=True):
        with torch.no_grad():
            out, (h, _) = model.rnn(x)
        assert predicted["segments"] == 11
        assert predicted["y"].shape == (4, 43, 1)
        assert torch.allclose(predicted["y"], model.head(out))
        assert torch.allclose(predicted["last"], h[-1]), "a per-sequence output comes from the last segment"


def test_validation_and_test_losses_are_token_weighted_over_the_whole_sequences(tmp_path):
    torch.manual_seed(0)
    model = Evaluated().double()
    loader = make_loader(length=23)  # segments of 5, 5, 5, 5, 3 steps
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)])
    expected = whole_sequence_mse(model, loader)
    (validated,) = trainer.validate(model, loader)
    (tested,) = trainer.test(model, loader)
    assert validated["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert tested["test_loss"] == pytest.approx(expected, rel=1e-6)
    assert model.eval_lengths == [5, 5, 5, 5, 3] * 3


def test_without_segmented_evaluation_the_step_sees_whole_batches(tmp_path):
    torch.manual_seed(0)
    model = Evaluated().double()
    loader = make_loader(length=23)
    expected = whole_sequence_mse(model, loader)
    (validated,) = make_trainer(tmp_path, [TBPTTCallback(5, evaluate=False)]).validate(model, loader)
    assert model.eval_lengths == [23] * 3
    assert validated["val_loss"] == pytest.approx(expected, rel=1e-6)


class MaskedEvaluated(Evaluated):
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = masked_mean((self(batch["x"]) - batch["y"]) ** 2)
        self.log("val_loss", loss)
        return loss

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        return self(batch["x"])


@pytest.mark.parametrize("drop_finished", [False, True], ids=["padded", "drop-finished"])
def test_padded_evaluation_counts_each_valid_step_once(tmp_path, drop_finished):
    torch.manual_seed(0)
    model = MaskedEvaluated().double()
    batches = padded_batches(LENGTHS)
    callback = TBPTTCallback(5, lengths="lengths", drop_finished=drop_finished)
    trainer = make_trainer(tmp_path, [callback])
    (validated,) = trainer.validate(model, loader_of(batches))
    predictions = trainer.predict(model, loader_of(batches))
    errors = []
    for batch, predicted in zip(batches, predictions, strict=True):
        assert predicted.shape == batch["y"].shape
        for row, length in enumerate(batch["lengths"].tolist()):
            with torch.no_grad():
                alone = model(batch["x"][row : row + 1, :length])[0]
            assert torch.allclose(predicted[row, :length], alone)
            errors.append(((alone - batch["y"][row, :length]) ** 2).flatten())
    assert validated["val_loss"] == pytest.approx(torch.cat(errors).mean().item(), rel=1e-6)


class LaneEvaluated(LaneRegressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.mse_loss(self(batch["x"]), batch["y"]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch["x"])


def test_streamed_prediction_continues_each_lane_across_batches(tmp_path):
    torch.manual_seed(0)
    model = LaneEvaluated().double()
    batches = lane_batches(starts=[])
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, resets="starts")])
    predictions = trainer.predict(model, loader_of(batches))
    with torch.no_grad():
        whole = model(torch.cat([batch["x"] for batch in batches], dim=1))
    assert torch.allclose(torch.cat(predictions, dim=1), whole)
    # twice in a row: every prediction run streams from zeros again
    assert torch.allclose(torch.cat(trainer.predict(model, loader_of(batches)), dim=1), whole)


def test_validation_inside_a_streamed_epoch_leaves_the_training_state_alone(tmp_path):
    batches = lane_batches()
    torch.manual_seed(0)
    model = LaneEvaluated(num_layers=2, log=False).double()
    reference = twin(model)
    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts")
    trainer = make_trainer(tmp_path, [callback], val_check_interval=1, num_sanity_val_steps=1)
    trainer.fit(model, loader_of(batches), loader_of(lane_batches(seed=1)))
    reference_lanes(reference, batches, SEGMENT)
    assert parameters_equal(model, reference)


class TransferRecorder(Evaluated):
    def __init__(self) -> None:
        super().__init__(log=False)
        self.moved: list[tuple[str, int]] = []
        self.before: list[int] = []

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.before.append(batch[0].shape[1])
        return batch

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        self.moved.append((self.trainer.state.stage.value, batch[0].shape[1]))
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


@pytest.mark.parametrize(
    ("transfer", "moved"),
    [("segment", [5, 5, 5, 5, 3]), ("batch", [23])],
)
def test_only_the_running_segment_is_moved_to_the_device(tmp_path, transfer, moved):
    model = TransferRecorder().double()
    loader = make_loader(length=23)
    trainer = make_trainer(tmp_path, [TBPTTCallback(5, transfer=transfer)], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, loader, loader)
    assert model.moved == [("sanity_check", n) for n in moved] + [("train", n) for n in moved * 2] + [
        ("validate", n) for n in moved
    ]
    assert model.before == [23] * 4, "on_before_batch_transfer still runs once per batch"


def test_a_bad_transfer_value():
    with pytest.raises(ConfigurationError, match=r"`transfer` to be one of \('segment', 'batch'\) but got 'lazy'"):
        TBPTTCallback(5, transfer="lazy")  # type: ignore[arg-type]


class IteratorValidation(Evaluated):
    def validation_step(self, dataloader_iter: Any) -> None:  # type: ignore[override]
        next(dataloader_iter)


def test_evaluation_steps_that_fetch_their_own_batches(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)])
    with pytest.raises(ModelError, match=r"`validation_step`, which fetches its own batches.*evaluate=False"):
        trainer.validate(IteratorValidation().double(), make_loader())
    make_trainer(tmp_path, [TBPTTCallback(5, evaluate=False)]).validate(IteratorValidation().double(), make_loader())


def test_the_evaluation_patches_are_removed_afterwards(tmp_path):
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)])
    trainer.validate(Evaluated().double(), make_loader())
    assert patched_loop_attributes(trainer) == []


class TransposesAfterTransfer(SequenceRegressor):
    """Batch-first data, a time-first model: `on_after_batch_transfer` changes the layout."""

    def __init__(self) -> None:
        super().__init__(batch_first=False, log=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return tuple(t.transpose(0, 1) for t in batch)


def test_a_module_that_changes_the_layout_after_transfer_gets_whole_batches_by_default(tmp_path):
    torch.manual_seed(0)
    model = TransposesAfterTransfer().double()
    reference = twin(model)
    loader = make_loader()
    make_trainer(tmp_path, [TBPTTCallback(5, time_dim=0)]).fit(model, loader)
    reference_tbptt(
        reference, [(x.transpose(0, 1), y.transpose(0, 1)) for x, y in loader], segment_length=5, time_dim=0
    )
    assert parameters_equal(model, reference)


def test_join_takes_per_sequence_and_one_dimensional_outputs_from_the_last_segment():
    lengths = torch.tensor([6, 2, 4])
    segments = [
        Segment(0, 2, 0, 3, time_dim=0, lengths=lengths.clamp(max=3)),
        Segment(1, 2, 3, 3, time_dim=0, lengths=(lengths - 3).clamp(0, 3)[[0, 2]], rows=torch.tensor([0, 2])),
    ]
    per_step_loss = [torch.ones(3), torch.full((3,), 2.0)]  # (T_seg,): not laid out like (T, B) sequences
    assert torch.equal(join_outputs(per_step_loss, segments, batch_size=3, time_length=6), per_step_loss[-1])
    states = [torch.zeros(3, 5), torch.ones(2, 5)]  # (B, H) with B == T_seg in the first segment
    assert torch.equal(join_outputs(states, segments, batch_size=3, time_length=6), states[-1])
    per_step = [torch.ones(3, 3, 1), torch.full((3, 2, 1), 2.0)]  # (T_seg, rows, 1)
    joined = join_outputs(per_step, segments, batch_size=3, time_length=6)
    assert joined[:, :, 0].tolist() == [[1, 1, 1]] * 3 + [[2, 0, 2]] * 3
