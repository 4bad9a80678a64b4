"""Recurrent cells stepped in a Python loop: the first call's state is injected, the last call's state carried."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_tbptt import ModelError, TBPTTCallback, masked_mean
from tests.helpers import (
    SequenceRegressor,
    fit_with_twin,
    make_loader,
    make_trainer,
    padded_batches,
    parameters_equal,
    reference_tbptt,
)
from tests.test_streaming import SEGMENT, lane_batches, reference_lanes

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}


class CellLoop(nn.Module):
    """What a user writes: the cell stepped over time, starting from ``None`` (or from a given state)."""

    def __init__(self, kind: str, input_size: int = 3, hidden_size: int = 6) -> None:
        super().__init__()
        self.cell = CELLS[kind](input_size, hidden_size)

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        outputs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outputs, dim=1), state


class CellRegressor(SequenceRegressor):
    """The same per-step regression as ``SequenceRegressor``, with the recurrence written as a cell loop."""

    def __init__(self, kind: str = "lstm", masked: bool = False, **kwargs: Any) -> None:
        super().__init__(cell=kind, log=False, **kwargs)
        self.rnn = CellLoop(kind)
        self.masked = masked

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch[:2]
        if self.masked:
            return masked_mean((self(x) - y).pow(2).squeeze(-1))
        return F.mse_loss(self(x), y)


class RNNRegressor(CellRegressor):
    """``CellRegressor`` with the loop replaced by the ``torch.nn`` RNN of the same weights."""

    def __init__(self, kind: str = "lstm", masked: bool = False) -> None:
        super().__init__(kind, masked)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](3, 6, batch_first=True)


def rnn_twin(model: CellRegressor, kind: str) -> RNNRegressor:
    twin = RNNRegressor(kind, model.masked).double()
    cell = model.rnn.cell
    with torch.no_grad():
        for ours, theirs in (("weight_ih", "weight_ih_l0"), ("weight_hh", "weight_hh_l0")):
            getattr(twin.rnn, theirs).copy_(getattr(cell, ours))
        twin.rnn.bias_ih_l0.copy_(cell.bias_ih)
        twin.rnn.bias_hh_l0.copy_(cell.bias_hh)
        twin.head.load_state_dict(model.head.state_dict())
    return twin


def same_parameters(cells: CellRegressor, rnns: RNNRegressor) -> bool:
    pairs = [
        (cells.rnn.cell.weight_ih, rnns.rnn.weight_ih_l0),
        (cells.rnn.cell.weight_hh, rnns.rnn.weight_hh_l0),
        (cells.rnn.cell.bias_ih, rnns.rnn.bias_ih_l0),
        (cells.rnn.cell.bias_hh, rnns.rnn.bias_hh_l0),
        (cells.head.weight, rnns.head.weight),
    ]
    return all(torch.allclose(p, q, rtol=0, atol=1e-10) for p, q in pairs)


@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.slow) if k == "lstm" else k for k in CELLS])
def test_a_cell_loop_equals_the_hand_written_tbptt_loop(tmp_path, kind):
    model, reference, loader, trainer = fit_with_twin(
        tmp_path, lambda: CellRegressor(kind).double(), [TBPTTCallback(5)]
    )
    result = reference_tbptt(reference, loader, segment_length=5)
    assert trainer.global_step == result["steps"] == 3 * 5
    assert parameters_equal(model, reference)
    # a negative control: without the carry, the reference differs
    _, uncarried, loader, _ = fit_with_twin(tmp_path, lambda: CellRegressor(kind).double(), [TBPTTCallback(5)])
    reference_tbptt(uncarried, loader, segment_length=5, carry=False)
    assert not parameters_equal(model, uncarried)


def fit_both(tmp_path: Any, kind: str, make_callback: Any, batches: Any, masked: bool = False) -> tuple[Any, Any]:
    torch.manual_seed(0)
    cells = CellRegressor(kind, masked).double()
    rnns = rnn_twin(cells, kind)
    assert same_parameters(cells, rnns)
    for model in (cells, rnns):
        make_trainer(tmp_path, [make_callback()]).fit(model, DataLoader(batches, batch_size=None))
    return cells, rnns


@pytest.mark.parametrize("kind", list(CELLS))
def test_streaming_with_resets_inside_segments_equals_the_per_lane_reference(tmp_path, kind):
    batches = lane_batches()
    cells, rnns = fit_both(tmp_path, kind, lambda: TBPTTCallback(SEGMENT, streaming=True, resets="starts"), batches)
    assert same_parameters(cells, rnns)
    torch.manual_seed(0)
    reference = rnn_twin(CellRegressor(kind).double(), kind)
    reference_lanes(reference, batches, SEGMENT)
    assert same_parameters(cells, reference)


@pytest.mark.parametrize("kind", [pytest.param("lstm", marks=pytest.mark.slow), "gru"])
def test_overlapping_windows_carry_the_state_after_the_stride(tmp_path, kind):
    batches = list(make_loader())
    cells, rnns = fit_both(tmp_path, kind, lambda: TBPTTCallback(8, stride=3), batches, masked=True)
    assert same_parameters(cells, rnns)


def test_dropped_rows_are_dropped_from_a_cells_state(tmp_path):
    batches = [(b["x"], b["y"], b["lengths"]) for b in padded_batches([[23, 7, 12, 1], [9, 9, 3, 16]])]
    cells, rnns = fit_both(
        tmp_path, "lstm", lambda: TBPTTCallback(5, lengths=2, drop_finished=True), batches, masked=True
    )
    assert same_parameters(cells, rnns)


class ZerosFirst(CellLoop):
    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        zeros = x.new_zeros(x.shape[0], self.cell.hidden_size)
        return super().forward(x, (zeros, zeros))


def test_a_loop_that_starts_from_explicit_zeros_is_reported(tmp_path):
    class Model(CellRegressor):
        def __init__(self) -> None:
            super().__init__("lstm")
            self.rnn = ZerosFirst("lstm")

    with pytest.warns(UserWarning, match=r"carried no state into \['rnn.cell'\].*start the loop from `None`"):
        model, reference, loader, _ = fit_with_twin(tmp_path, lambda: Model().double(), [TBPTTCallback(5)])
    reference_tbptt(reference, loader, segment_length=5, carry=False)
    assert parameters_equal(model, reference)


class TwiceAStep(CellLoop):
    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        outputs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            state = self.cell(x[:, t], state)
            outputs.append(state[0])
        return torch.stack(outputs, dim=1), state


def test_a_cell_not_stepped_once_per_step_cannot_be_reset_inside_a_segment(tmp_path):
    class Model(CellRegressor):
        def __init__(self) -> None:
            super().__init__("lstm")
            self.rnn = TwiceAStep("lstm")

    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, resets="starts")])
    match = r"cell `rnn.cell` \(LSTMCell\) to be called once per time step of the segment \(5\) but it was called 10"
    with pytest.raises(ModelError, match=match):
        trainer.fit(Model().double(), DataLoader(lane_batches(), batch_size=None))
    # without a reset or a window start inside a segment, any number of calls is fine
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT)])
    trainer.fit(Model().double(), make_loader())
    assert trainer.global_step == 15


def test_a_cell_called_on_other_rows_than_its_state_is_named():
    from lightning_tbptt.state import StateCarrier

    cell = nn.GRUCell(3, 4)
    carrier = StateCarrier({"cell": cell})
    with carrier.segment(None, 4):
        cell(torch.zeros(4, 3))
    match = r"`cell` \(GRUCell\) to be called on the 4 rows .* got an input of 2 rows"
    with pytest.raises(ModelError, match=match), carrier.segment(None, 2):
        cell(torch.zeros(2, 3))
