"""The checkpoint record: written and read back, refused when newer, split per process when gathered."""

from typing import Any

import pytest
import torch

from lightning_tbptt.checkpoint import CHECKPOINT_FORMAT, CheckpointRecord
from lightning_tbptt.errors import ConfigurationError


def test_a_record_round_trips_through_its_entry():
    record = CheckpointRecord(
        epoch=2,
        batches_done=3,
        mid_epoch=True,
        accumulated=1,
        streaming=True,
        config={"segment_length": 8},
        gradients={"w": torch.ones(2)},
        lanes=4,
        carried={"rnn": torch.zeros(1, 4, 3)},
        unfinished=torch.zeros(4, dtype=torch.uint8),
    )
    entry = record.to_dict()
    assert entry["version"] == CHECKPOINT_FORMAT
    assert "pending_gradients" not in entry
    back = CheckpointRecord.from_dict(entry)
    assert back.pending_gradients  # it holds gradients
    assert (back.epoch, back.batches_done, back.mid_epoch, back.accumulated, back.lanes) == (2, 3, True, 1, 4)
    assert torch.equal(back.carried["rnn"], record.carried["rnn"])
    assert back.to_dict().keys() == entry.keys()


def test_a_record_without_streaming_writes_no_stream_and_an_old_entry_reads():
    entry = CheckpointRecord(epoch=1).to_dict()
    assert {"lanes", "carried", "unfinished", "gradients"}.isdisjoint(entry)
    del entry["version"], entry["config"]  # as release 0.1.0 wrote it
    record = CheckpointRecord.from_dict(entry)
    assert record.config is None and not record.pending_gradients and record.carried == {}


def test_a_newer_format_is_refused_before_anything_else_is_read():
    with pytest.raises(ConfigurationError, match=f"in format {CHECKPOINT_FORMAT} or older but it is in format 99"):
        CheckpointRecord.from_dict({"version": 99})


def test_an_entry_missing_keys_is_refused_by_name():
    with pytest.raises(ConfigurationError, match=r"`batches_done` as an integer >= 0 \(it has none\)"):
        CheckpointRecord.from_dict({"version": 1, "epoch": 0})


def test_each_process_takes_its_own_part_of_a_gathered_record():
    gathered = CheckpointRecord(
        world_size=2,
        gathered=True,
        streaming=True,
        gradients={"a": torch.tensor([[1.0], [2.0]]), "b": torch.tensor([[0.0], [3.0]])},
        gradients_present=torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8),
        carried={"rnn": torch.tensor([[5.0], [6.0]])},
        unfinished=torch.tensor([[1], [0]], dtype=torch.uint8),
    )
    first, second = gathered.for_process(0), gathered.for_process(1)
    assert first.gradients is not None and list(first.gradients) == ["a"]  # process 0 had no gradient for b
    assert second.gradients is not None and torch.equal(second.gradients["b"], torch.tensor([3.0]))
    assert torch.equal(first.carried["rnn"], torch.tensor([5.0]))
    assert second.unfinished is not None and second.unfinished.tolist() == [0]
    alone = CheckpointRecord(epoch=1)
    assert alone.for_process(3) is alone


def test_a_later_evaluation_keeps_where_training_stands(tmp_path):
    from lightning_tbptt import TBPTTCallback
    from tests.helpers import SequenceRegressor, make_loader, make_trainer

    class Evaluated(SequenceRegressor):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])

    callback = TBPTTCallback(5)
    trainer = make_trainer(tmp_path, [callback], limit_train_batches=2)
    model = Evaluated(log=False).double()
    trainer.fit(model, make_loader())
    assert callback.state_dict()["batches_done"] == 2
    trainer.validate(model, make_loader(), verbose=False)  # a checkpoint saved now still says where training stands
    after_validate = callback.state_dict()
    assert (after_validate["epoch"], after_validate["batches_done"]) == (0, 2)
