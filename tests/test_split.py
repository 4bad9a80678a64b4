"""Cutting batches into segments along time: the rule, views, round trips, every collection type, errors."""

import dataclasses
from collections import namedtuple
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_tbptt import BatchError, TBPTTCallback
from lightning_tbptt.split import batch_dim, segment_bounds, sequence_length, slice_batch, split_batch
from tests.helpers import SequenceRegressor, make_data, make_trainer, parameters_equal, reference_tbptt, twin

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


def sparse(tensor: torch.Tensor, layout: torch.layout) -> torch.Tensor:
    return tensor.to_sparse_coo() if layout == torch.sparse_coo else tensor.to_sparse(layout=layout)


def mostly_zero(*shape: int) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return torch.where(x > 0.5, x, torch.zeros(()))


@pytest.mark.parametrize(
    ("layout", "shape", "time_dim"),
    [(torch.sparse_coo, (3, 7, 2), 1), (torch.sparse_coo, (7, 3, 2), 0), (torch.sparse_csr, (3, 7), 1)],
    ids=["coo", "coo-time-first", "csr"],
)
def test_sparse_sequence_tensors_are_cut_into_sparse_copies(layout, shape, time_dim):
    dense = mostly_zero(*shape)
    # per-sequence labels only beside batch-first sequences (see the rule)
    batch = {"x": sparse(dense, layout)} if time_dim == 0 else {"x": sparse(dense, layout), "label": torch.arange(3)}
    segments = split_batch(batch, 3, time_dim=time_dim)
    assert [s["x"].layout for s in segments] == [layout] * 3
    back = torch.cat([s["x"].to_dense() for s in segments], dim=time_dim)
    assert torch.equal(back, dense)
    rows = torch.tensor([2, 0])
    selected = slice_batch(batch, 3, 6, time_dim, rows)
    expected = dense.narrow(time_dim, 3, 3).index_select(batch_dim(time_dim), rows)
    assert selected["x"].layout == layout
    assert torch.equal(selected["x"].to_dense(), expected)
    assert time_dim == 0 or selected["label"].tolist() == [2, 0]


def test_a_sparse_layout_that_cannot_be_cut_is_a_batch_error():
    x = mostly_zero(3, 8).to_sparse_bsr((1, 2))
    with pytest.raises(BatchError, match=r"got a torch.sparse_bsr tensor of shape \(3, 8\), which cannot be cut along"):
        split_batch((x, torch.zeros(3, 8)), 3)


class SparseInputRegressor(SequenceRegressor):
    """Reads a sparse input (as a model for sparse features would), densified before the LSTM."""

    def __init__(self, layout: torch.layout, input_size: int) -> None:
        super().__init__(input_size=input_size)
        self.layout = layout

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        assert x.layout == self.layout
        dense = x.to_dense()
        return super().training_step((dense if dense.dim() == 3 else dense.unsqueeze(-1), y), batch_idx)


@pytest.mark.parametrize(("layout", "input_size"), [(torch.sparse_coo, 3), (torch.sparse_csr, 1)], ids=["coo", "csr"])
def test_a_fit_on_sparse_inputs_equals_the_reference_loop_on_dense_ones(tmp_path, layout, input_size):
    x, y = make_data(num_sequences=8, length=11, input_size=input_size)
    x = torch.where(x > 0.3, x, torch.zeros((), dtype=x.dtype))
    dense_batches = [(x[i : i + 4], y[i : i + 4]) for i in (0, 4)]
    sparse_batches = [(sparse(xb if input_size > 1 else xb.squeeze(-1), layout), yb) for xb, yb in dense_batches]
    torch.manual_seed(0)
    model = SparseInputRegressor(layout, input_size).double()
    reference = twin(model)
    trainer = make_trainer(tmp_path, [TBPTTCallback(4)])
    trainer.fit(model, DataLoader(sparse_batches, batch_size=None))
    assert trainer.global_step == 6
    counts = reference_tbptt(reference, dense_batches, segment_length=4)
    assert counts["steps"] == 6
    assert parameters_equal(model, reference)
