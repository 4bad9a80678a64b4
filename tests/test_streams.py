"""A stream of batches on its own: lanes, unfinished rows, restored state, evaluation dataloaders."""

import pytest
import torch

from lightning_tbptt.errors import BatchError
from lightning_tbptt.fields import FieldLocation
from lightning_tbptt.plan import plan_segments
from lightning_tbptt.streams import Stream


def plan(rows: int, lengths: list[int] | None = None, resets: list[bool] | None = None, steps: int = 6):
    batch: dict[str, torch.Tensor] = {"x": torch.zeros(rows, steps, 1)}
    if lengths is not None:
        batch["n"] = torch.tensor(lengths)
    if resets is not None:
        batch["r"] = torch.tensor(resets)
    return plan_segments(
        batch,
        4,
        lengths=None if lengths is None else FieldLocation("n"),
        resets=None if resets is None else FieldLocation("r", argument="resets"),
    )


def test_without_streaming_every_batch_starts_from_zeros():
    stream = Stream("train")
    stream.state.carried["rnn"] = torch.ones(1)
    stream.begin_batch(plan(2), streaming=False)
    assert stream.state.carried == {} and stream.lanes is None
    stream.begin_batch(plan(3), streaming=False)  # any number of rows


def test_streaming_keeps_the_state_and_refuses_other_rows():
    stream = Stream("train")
    stream.begin_batch(plan(2), streaming=True)
    stream.state.carried["rnn"] = torch.ones(1)
    stream.begin_batch(plan(2), streaming=True)
    assert "rnn" in stream.state.carried and stream.lanes == 2
    with pytest.raises(BatchError, match="got a batch of 3 rows after batches of 2"):
        stream.begin_batch(plan(3), streaming=True)


def test_rows_that_ended_early_must_start_anew_in_the_next_batch():
    stream = Stream("train")
    stream.begin_batch(plan(2, lengths=[6, 3]), streaming=True)
    assert stream.unfinished is not None and stream.unfinished.tolist() == [False, True]
    with pytest.raises(BatchError, match=r"Expected the rows \[1\] whose sequence ended"):
        stream.begin_batch(plan(2, resets=[False, False]), streaming=True)
    stream.begin_batch(plan(2, resets=[False, True]), streaming=True)


def test_a_restored_stream_names_the_checkpoint_when_the_rows_differ():
    stream = Stream("train")
    stream.restore({"rnn": torch.ones(1, 4, 2)}, lanes=4, unfinished=torch.zeros(4, dtype=torch.uint8))
    assert stream.restored and stream.unfinished is not None and stream.unfinished.dtype == torch.bool
    assert stream.state.rows == {"rnn": (None, 0)}
    with pytest.raises(BatchError, match="continue the lanes of the checkpoint being resumed, which carries the state"):
        stream.begin_batch(plan(3), streaming=True)
    stream.begin_batch(plan(4), streaming=True)
    assert not stream.restored  # from now on a mismatch is the data's


def test_each_evaluation_dataloader_streams_from_zeros():
    stream = Stream("eval")
    stream.enter_dataloader(0)
    stream.state.carried["rnn"] = torch.ones(1)
    stream.enter_dataloader(0)
    assert "rnn" in stream.state.carried
    stream.enter_dataloader(1)
    assert stream.state.carried == {} and stream.dataloader == 1
