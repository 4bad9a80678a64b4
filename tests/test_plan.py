"""Planning the segments of a batch: skipped tails, segment lengths, dropped rows, the mask, laziness."""

import dataclasses

import pytest
import torch

from lightning_tbptt import BatchError
from lightning_tbptt.fields import FieldLocation
from lightning_tbptt.plan import plan_custom_segments, plan_segments


def padded_batch() -> dict[str, torch.Tensor]:
    x = torch.arange(4 * 12, dtype=torch.float32).reshape(4, 12, 1)
    return {"x": x, "label": torch.tensor([0, 1, 2, 3]), "lengths": torch.tensor([12, 5, 9, 1])}


def test_without_lengths_every_step_counts():
    batch = padded_batch()
    plan = plan_segments(batch, 5)
    assert len(plan) == 3
    segments = list(plan)
    assert [s.info.length for s in segments] == [5, 5, 2]
    assert all(s.info.mask.all() and s.info.mask.shape == (4, s.info.length) for s in segments)
    assert [s.info.num_valid for s in segments] == [20, 20, 8]


def test_segments_stop_at_the_longest_sequence_and_carry_their_own_lengths():
    batch = padded_batch()
    batch["lengths"] = torch.tensor([7, 5, 9, 1])  # padded to 12, longest 9
    segments = list(plan_segments(batch, 4, lengths=FieldLocation("lengths")))
    assert [(s.info.start, s.info.length) for s in segments] == [(0, 4), (4, 4), (8, 1)]
    assert [s.batch["lengths"].tolist() for s in segments] == [[4, 4, 4, 1], [3, 1, 4, 0], [0, 0, 1, 0]]
    assert [s.batch["x"].shape[1] for s in segments] == [4, 4, 1]
    assert segments[1].info.mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 4, [False] * 4]
    assert [s.info.num_valid for s in segments] == [13, 8, 1]
    assert segments[0].batch["label"] is batch["label"]
    assert batch["lengths"].tolist() == [7, 5, 9, 1], "the batch itself is not modified"


def test_dropping_finished_rows():
    batch = padded_batch()  # lengths 12, 5, 9, 1
    segments = list(plan_segments(batch, 4, lengths=FieldLocation("lengths"), drop_finished=True))
    rows = [None if s.info.rows is None else s.info.rows.tolist() for s in segments]
    assert rows == [None, [0, 1, 2], [0, 2]]
    assert [s.batch["label"].tolist() for s in segments] == [[0, 1, 2, 3], [0, 1, 2], [0, 2]]
    assert [s.batch["lengths"].tolist() for s in segments] == [[4, 4, 4, 1], [4, 1, 4], [4, 1]]
    assert all((s.batch["lengths"] > 0).all() for s in segments), "no row of a segment has length 0"
    assert torch.equal(segments[2].batch["x"], batch["x"][[0, 2], 8:12])


def test_rows_of_length_zero_are_dropped_from_the_first_segment():
    batch = {"x": torch.zeros(3, 6, 1), "lengths": torch.tensor([6, 0, 2])}
    first = next(iter(plan_segments(batch, 4, lengths=FieldLocation("lengths"), drop_finished=True)))
    assert first.info.rows.tolist() == [0, 2]


def test_time_first_batches_with_lengths_by_index():
    x = torch.zeros(10, 3, 2)  # (T, B, F)
    batch = (x, torch.tensor([10, 4, 6]))
    segments = list(plan_segments(batch, 4, time_dim=0, lengths=FieldLocation(1), drop_finished=True))
    assert [s.batch[0].shape for s in segments] == [(4, 3, 2), (4, 2, 2), (2, 1, 2)]
    assert segments[1].info.sequence_mask.shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_every_integer_dtype_of_lengths_gives_the_same_segments(dtype):
    batch = (torch.zeros(2, 10, 1), torch.tensor([10, 3], dtype=dtype))
    segments = list(plan_segments(batch, 4, lengths=FieldLocation(1)))
    assert [s.info.lengths.tolist() for s in segments] == [[4, 3], [4, 0], [2, 0]]
    assert all(s.info.lengths.dtype == torch.int64 for s in segments)
    assert all(s.batch[1].dtype == dtype for s in segments), "written back with the batch's own dtype"


def test_dataclass_batches_are_copied_not_re_initialised():
    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        lengths: torch.Tensor
        derived: torch.Tensor = dataclasses.field(init=False)

        def __post_init__(self) -> None:
            self.derived = self.lengths * 2  # would fail if __init__ ran again with lengths=None

    segments = list(
        plan_segments(Batch(torch.zeros(2, 6, 1), torch.tensor([6, 2])), 4, lengths=FieldLocation("lengths"))
    )
    assert [s.batch.lengths.tolist() for s in segments] == [[4, 2], [2, 0]]
    assert [s.batch.x.shape[1] for s in segments] == [4, 2]


def test_callable_lengths_in_a_time_first_batch_say_how_to_fix_it():
    batch = {"x": torch.zeros(10, 3, 2), "n": torch.tensor([10, 4, 2])}
    with pytest.raises(BatchError, match=r"pass its key or index instead") as error:
        plan_segments(batch, 4, time_dim=0, lengths=FieldLocation(lambda b: b["n"]))
    assert "split_batch" not in str(error.value), "a custom split cannot be combined with lengths"


def test_plans_build_one_segment_at_a_time():
    plan = plan_segments(padded_batch(), 2, lengths=FieldLocation("lengths"))
    iterator = iter(plan)
    first = next(iterator)
    assert first.info.index == 0
    assert first.info.count == len(plan) == 6


def test_a_batch_of_empty_sequences_is_rejected():
    batch = {"x": torch.zeros(2, 3), "lengths": torch.tensor([0, 0])}
    with pytest.raises(BatchError, match=r"every length at batch\['lengths'\] is 0"):
        plan_segments(batch, 2, lengths=FieldLocation("lengths"))


def test_custom_segments_must_follow_the_sequence_rule():
    plan = plan_custom_segments([(torch.zeros(2, 3, 1),), ("no tensor",)], time_dim=1, source="Mine.split_batch")
    iterator = iter(plan)
    assert next(iterator).info.mask.shape == (2, 3)
    with pytest.raises(BatchError, match=r"In segment 1 returned by `Mine.split_batch`: Expected the batch"):
        next(iterator)
