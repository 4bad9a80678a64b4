"""Cutting batches into segments along time: the rule, views, round trips, every collection type, errors."""

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch

from lightning_tbptt import BatchError
from lightning_tbptt.split import segment_bounds, sequence_length, split_batch

Pair = namedtuple("Pair", ["x", "y"])


@dataclasses.dataclass
class Record:
    x: torch.Tensor
    name: str
    extra: dict[str, Any]


def test_segment_bounds_cover_the_sequence_with_a_ragged_last_segment():
    assert segment_bounds(23, 5) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    assert segment_bounds(20, 5)[-1] == (15, 20)
    assert segment_bounds(3, 10) == [(0, 3)]


@pytest.mark.parametrize("time_dim", [0, 1, 2])
def test_split_then_concatenate_gives_the_input_back(time_dim):
    x = torch.randn(4, 6, 7, 2)
    segments = split_batch(x, 3, time_dim=time_dim)
    assert all(s.shape[time_dim] <= 3 for s in segments)
    assert torch.equal(torch.cat(segments, dim=time_dim), x)


def test_segments_are_views_not_copies():
    x = torch.randn(2, 10, 3)
    for segment in split_batch((x,), 4):
        assert segment[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_nested_collections_keep_their_structure():
    x = torch.randn(2, 9, 3)
    label = torch.tensor([1, 0])
    batch = {
        "pair": Pair(x, x[..., 0]),
        "items": [x, (label, "text")],
        "record": Record(x, "name", {"mask": torch.ones(2, 9, dtype=torch.bool), "scale": 2.0}),
        "none": None,
    }
    segments = split_batch(batch, 4)
    assert len(segments) == 3
    last = segments[-1]
    assert isinstance(last["pair"], Pair)
    assert last["pair"].x.shape == (2, 1, 3)
    assert last["pair"].y.shape == (2, 1)
    assert last["items"][0].shape == (2, 1, 3)
    assert last["items"][1][0] is label, "tensors without a time dimension pass through unchanged"
    assert last["items"][1][1] == "text"
    assert isinstance(last["record"], Record)
    assert last["record"].name == "name"
    assert last["record"].extra["mask"].shape == (2, 1)
    assert last["record"].extra["scale"] == 2.0
    assert last["none"] is None
    assert torch.equal(torch.cat([s["record"].x for s in segments], dim=1), x)


def test_time_first_batches_leave_per_sequence_tensors_alone_only_if_they_lack_the_time_dim():
    x = torch.randn(9, 2, 3)  # (T, B, F)
    scalar = torch.tensor(3.0)
    segments = split_batch((x, scalar), 4, time_dim=0)
    assert [s[0].shape[0] for s in segments] == [4, 4, 1]
    assert all(s[1] is scalar for s in segments)


def test_sequence_length_rule():
    assert sequence_length((torch.zeros(2, 7, 3), torch.zeros(2, 7), torch.zeros(2))) == 7
    assert sequence_length([torch.zeros(7, 2)], time_dim=0) == 7


@pytest.mark.parametrize(
    ("batch", "time_dim", "match"),
    [
        (["a", 1], 1, r"at least one tensor to cut along `time_dim=1` but got a batch of type list without tensors"),
        ((torch.zeros(2, 3),), 2, r"dimension `time_dim=2` but got tensors of shapes \[\(2, 3\)\]\. Set `time_dim`"),
        (
            {"x": torch.zeros(2, 5, 3), "static": torch.zeros(2, 4)},
            1,
            r"sizes \[5, 4\] for tensors of shapes \[\(2, 5, 3\), \(2, 4\)\]\. Pad them to one length, give "
            r"per-sequence tensors \(labels, lengths\) at most 1 dimension, or override `TBPTTCallback.split_batch`",
        ),
        ((torch.zeros(2, 0, 3),), 1, r"at least one time step along `time_dim=1` but got length 0"),
    ],
    ids=["no-tensor", "time_dim-out-of-range", "lengths-disagree", "empty"],
)
def test_batches_that_cannot_be_split(batch, time_dim, match):
    with pytest.raises(BatchError, match=match):
        split_batch(batch, 2, time_dim=time_dim)


def test_long_shape_lists_are_shortened():
    tensors = [torch.zeros(1, n + 1) for n in range(12)]
    with pytest.raises(BatchError, match=r"\(1, 8\), \.\.\.\]"):
        sequence_length(tensors)
