"""Streaming across batches and per-lane resets: exact against a per-lane hand-written reference loop."""

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_tbptt import BatchError, ConfigurationError, ModelError, TBPTTCallback
from lightning_tbptt.state import StateCarrier, detach_state
from tests.helpers import LR, MOMENTUM, SequenceRegressor, loader_of, make_trainer, parameters_equal, twin

LANES, STEPS, BATCHES, SEGMENT = 4, 14, 3, 5
# (lane, step of the stream) where a new sequence starts: inside segments, on segment and batch boundaries
STARTS = [(0, 3), (0, 14), (1, 7), (1, 8), (2, 28), (2, 30), (3, 19), (3, 41)]


class LaneRegressor(SequenceRegressor):
    """Per-step regression on dict batches; nothing about streaming or resets appears in it."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self(batch["x"]), batch["y"])


def lane_batches(starts: list[tuple[int, int]] = STARTS, flags_only: bool = False, seed: int = 0) -> list[Any]:
    """``BATCHES`` consecutive batches of ``LANES`` lanes; ``starts`` as per-step markers or per-row flags."""
    generator = torch.Generator().manual_seed(seed)
    total = BATCHES * STEPS
    x = torch.randn(LANES, total, 3, generator=generator, dtype=torch.float64)
    y = torch.cumsum(x[..., :1], dim=1) / 5
    markers = torch.zeros(LANES, total, dtype=torch.bool)
    for lane, step in starts:
        markers[lane, step] = True
    batches = []
    for i in range(BATCHES):
        piece = slice(i * STEPS, (i + 1) * STEPS)
        batch_starts = markers[:, piece]
        batches.append(
            {"x": x[:, piece], "y": y[:, piece], "starts": batch_starts[:, 0].clone() if flags_only else batch_starts}
        )
    return batches


def reference_lanes(model: Any, batches: list[Any], segment_length: int, streaming: bool = True) -> int:
    """The oracle: every lane runs alone, its state set to ``None`` (zeros) at each start marker.

    A segment's loss is the mean squared error over all lanes and steps of the segment. Returns the number of steps.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    states: list[Any] = [None] * LANES
    steps = 0
    for batch in batches:
        x, y, starts = batch["x"], batch["y"], batch["starts"]
        length = x.shape[1]
        if starts.dim() == 1:
            starts = torch.cat([starts[:, None], torch.zeros(LANES, length - 1, dtype=torch.bool)], dim=1)
        if not streaming:
            states = [None] * LANES
        for start in range(0, length, segment_length):
            stop = min(start + segment_length, length)
            outputs = []
            for lane in range(LANES):
                state, pieces, begin = states[lane], [], start
                cuts = [step for step in range(start, stop) if starts[lane, step]]
                for cut in [*cuts, stop]:
                    if cut > begin:
                        out, state = model.rnn(x[lane : lane + 1, begin:cut], state)
                        pieces.append(out)
                    if cut < stop:
                        state = None  # a new sequence starts at `cut`
                    begin = cut
                outputs.append(torch.cat(pieces, dim=1))
                states[lane] = detach_state(state)
            F.mse_loss(model.head(torch.cat(outputs)), y[:, start:stop]).backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return steps


def fit_lanes(tmp_path: Any, callback: TBPTTCallback, batches: list[Any], cell: str = "lstm") -> tuple[Any, Any, Any]:
    torch.manual_seed(0)
    model = LaneRegressor(cell=cell, num_layers=2, log=False).double()
    reference = twin(model)
    trainer = make_trainer(tmp_path, [callback])
    trainer.fit(model, loader_of(batches))
    return model, reference, trainer


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("flags_only", [False, True], ids=["per-step-markers", "per-row-flags"])
def test_streaming_with_resets_equals_the_per_lane_reference(tmp_path, cell, flags_only):
    starts = STARTS if not flags_only else [(0, 14), (2, 28)]
    batches = lane_batches(starts, flags_only=flags_only)
    model, reference, trainer = fit_lanes(
        tmp_path, TBPTTCallback(SEGMENT, streaming=True, resets="starts"), batches, cell
    )
    steps = reference_lanes(reference, batches, SEGMENT)
    assert trainer.global_step == steps == BATCHES * 3
    assert parameters_equal(model, reference)


def test_without_streaming_each_batch_starts_from_zeros_and_resets_still_apply(tmp_path):
    batches = lane_batches()
    model, reference, _ = fit_lanes(tmp_path, TBPTTCallback(SEGMENT, resets="starts"), batches)
    reference_lanes(reference, batches, SEGMENT, streaming=False)
    assert parameters_equal(model, reference)


def test_streaming_and_resets_both_change_the_result(tmp_path):
    """Negative controls: the reference distinguishes carrying across batches, and honouring the markers."""
    batches = lane_batches()
    not_streamed, reference, _ = fit_lanes(tmp_path, TBPTTCallback(SEGMENT, resets="starts"), batches)
    reference_lanes(reference, batches, SEGMENT)
    assert not parameters_equal(not_streamed, reference)
    without_resets, _, _ = fit_lanes(tmp_path, TBPTTCallback(SEGMENT, streaming=True), batches)
    assert not parameters_equal(without_resets, reference)


def test_a_reset_inside_a_segment_equals_running_the_two_pieces_separately():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True).double()
    carrier = StateCarrier({"lstm": lstm})
    x = torch.randn(2, 10, 3, dtype=torch.float64, requires_grad=True)
    starts = torch.zeros(2, 10, dtype=torch.bool)
    starts[0, 4] = True
    with carrier.segment(resets=starts):
        out, _ = lstm(x)
    separately = torch.cat([lstm(x[:1, :4])[0], lstm(x[:1, 4:])[0]], dim=1)
    assert torch.allclose(out[:1], separately)
    assert torch.allclose(out[1:], lstm(x[1:])[0]), "a row without a marker runs straight through"
    (gradient,) = torch.autograd.grad(out[0, 4:].sum(), x)
    assert gradient[0, :4].abs().max() == 0, "no gradient crosses the reset"
    assert gradient[0, 4:].abs().max() > 0
    h, _ = carrier.carried["lstm"]
    assert torch.allclose(h[:, :1], lstm(x[:1, 4:])[1][0]), "the carried state is the one after the reset"
    assert torch.allclose(h[:, 1:], lstm(x[1:])[1][0])
    carrier.remove()


def test_a_reset_at_a_segment_start_zeroes_only_that_lane():
    torch.manual_seed(0)
    gru = torch.nn.GRU(3, 4).double()  # time first
    carrier = StateCarrier({"gru": gru})
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    with carrier.segment():
        gru(x[:4])
    starts = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with carrier.segment(resets=starts):
        out, _ = gru(x[4:])
    assert torch.allclose(out[:, 0], gru(x[4:, :1])[0][:, 0]), "lane 0 starts from zeros"
    assert torch.allclose(out[:, 1], gru(x[:, 1:])[0][4:, 0]), "lane 1 continues"
    carrier.remove()


def test_a_custom_cell_is_split_at_a_reset_too(tmp_path):
    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = torch.nn.RNN(3, 4, batch_first=True)

        def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
            out, h = self.rnn(x, None if state is None else state["h"])
            return out, {"h": h}

    torch.manual_seed(0)
    cell = Cell().double()
    carrier = StateCarrier({"cell": cell})
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    starts = torch.zeros(3, 6, dtype=torch.bool)
    starts[2, 2] = True
    with carrier.segment(resets=starts):
        out, _ = cell(x)
    assert torch.allclose(out[2:, 2:], cell(x[2:, 2:])[0])
    assert torch.allclose(out[:2], cell(x[:2])[0])
    carrier.remove()


def test_a_packed_input_cannot_be_reset_inside_a_segment(tmp_path):
    class PackingRegressor(LaneRegressor):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            lengths = torch.full((x.shape[0],), x.shape[1])
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True)
            out, _ = self.rnn(packed)
            return self.head(torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0])

    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, resets="starts")])
    with pytest.raises(ModelError, match=r"Cannot split the call of `rnn` \(LSTM\) inside a segment.*PackedSequence"):
        trainer.fit(PackingRegressor().double(), loader_of(lane_batches()))


def test_streaming_refuses_a_batch_with_other_lanes(tmp_path):
    batches = lane_batches()
    batches[2] = {key: value[:3] for key, value in batches[2].items()}
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, resets="starts")])
    with pytest.raises(BatchError, match=r"batch of 3 rows after batches of 4\. .*drop_last=True"):
        trainer.fit(LaneRegressor().double(), loader_of(batches))


@pytest.mark.parametrize(
    ("starts", "match"),
    [
        (torch.zeros(LANES, STEPS), r"boolean tensor of shape \(4,\).* but got a torch.float32 tensor of shape"),
        (torch.zeros(LANES, STEPS + 1, dtype=torch.bool), r"or \(4, 14\) .* shape \(4, 15\)"),
        (torch.zeros(LANES + 1, dtype=torch.bool), r"shape \(5,\)"),
    ],
    ids=["float", "too-long", "too-many-rows"],
)
def test_bad_reset_markers(tmp_path, starts, match):
    batches = lane_batches()
    batches[0]["starts"] = starts
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, resets="starts")])
    with pytest.raises(BatchError, match=r"Expected the reset markers at batch\['starts'\] to be a .*" + match):
        trainer.fit(LaneRegressor().double(), loader_of(batches))


def test_missing_reset_markers(tmp_path):
    batches = [{key: value for key, value in batch.items() if key != "starts"} for batch in lane_batches()]
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, resets="starts")])
    with pytest.raises(BatchError, match=r"to hold resets at batch\['starts'\] .* has no key 'starts'"):
        trainer.fit(LaneRegressor().double(), loader_of(batches))


def test_streaming_cannot_drop_finished_rows():
    with pytest.raises(ConfigurationError, match=r"\(drop_finished=True\)` cannot be combined with `streaming=True`"):
        TBPTTCallback(5, lengths="lengths", drop_finished=True, streaming=True)


def test_streaming_rejects_non_bool():
    with pytest.raises(ConfigurationError, match=r"Expected argument `streaming` to be a bool but got 'yes'"):
        TBPTTCallback(5, streaming="yes")  # type: ignore[arg-type]


def padded_lane_batches(restart: bool) -> list[Any]:
    batches = lane_batches()
    for batch in batches:
        batch["lengths"] = torch.full((LANES,), STEPS)
    batches[0]["lengths"][1] = 9  # lane 1's sequence ends inside the first batch
    batches[1]["starts"][1, 0] = restart
    return batches


def test_a_lane_that_ends_early_must_restart_in_the_next_batch(tmp_path):
    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", lengths="lengths")
    with pytest.raises(BatchError, match=r"rows \[1\] whose sequence ended before the end of the previous batch"):
        make_trainer(tmp_path, [callback]).fit(LaneRegressor().double(), loader_of(padded_lane_batches(False)))
    callback = TBPTTCallback(SEGMENT, streaming=True, resets="starts", lengths="lengths")
    make_trainer(tmp_path, [callback]).fit(LaneRegressor().double(), loader_of(padded_lane_batches(True)))


class HiddensLaneModel(LaneRegressor):
    def training_step(self, batch: Any, batch_idx: int, hiddens: Any) -> Any:
        return None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"streaming": True}, r"\(streaming=True\)"), ({"resets": "starts"}, r"\(resets='starts'\)")],
    ids=["streaming", "resets"],
)
def test_streaming_and_resets_need_the_callback_to_carry_the_state(tmp_path, kwargs, match):
    with pytest.raises(ConfigurationError, match=match + r"` cannot work with `hiddens`"):
        make_trainer(tmp_path, [TBPTTCallback(SEGMENT, **kwargs)]).fit(HiddensLaneModel(), loader_of(lane_batches()))


def reset_once(module: torch.nn.Module, name: str, row: int, step: int, call: Any) -> tuple[Any, Any]:
    """Run ``call(module, x)`` on a ``(2, 6, 3)`` batch in one segment in which ``row`` starts anew at ``step``."""
    module = module.double()
    carrier = StateCarrier({name: module})
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    starts = torch.zeros(2, 6, dtype=torch.bool)
    starts[row, step] = True
    with carrier.segment(resets=starts):
        out, _ = call(module, x)
    carrier.remove()
    return x, out


def test_a_reset_inside_a_segment_with_the_state_passed_by_keyword_as_none():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x, out = reset_once(lstm, "lstm", 1, 2, lambda module, x: module(x, hx=None))
    assert torch.allclose(out[1:, 2:], lstm(x[1:, 2:])[0])


class MaskedCell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.GRU(3, 4, batch_first=True)

    def forward(self, x: torch.Tensor, state: Any = None, *, mask: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.rnn(x * mask.unsqueeze(-1), state)


def test_per_step_arguments_of_a_custom_cell_are_cut_at_a_reset_too():
    torch.manual_seed(0)
    cell = MaskedCell()
    mask = torch.rand(2, 6, dtype=torch.float64)
    x, out = reset_once(cell, "cell", 0, 4, lambda module, x: module(x, mask=mask))
    assert torch.allclose(out[:1, 4:], cell(x[:1, 4:], mask=mask[:1, 4:])[0])
    assert torch.allclose(out[1:], cell(x[1:], mask=mask[1:])[0])


class KeywordCell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.GRU(3, 4, batch_first=True)

    def forward(self, x: torch.Tensor, h: Any = None) -> tuple[torch.Tensor, Any]:
        return self.rnn(x, h)


def test_a_custom_cell_given_its_input_by_keyword_is_split_at_a_reset():
    torch.manual_seed(0)
    cell = KeywordCell()
    x, out = reset_once(cell, "cell", 0, 3, lambda module, x: module(x=x))
    assert torch.allclose(out[:1, 3:], cell(x[:1, 3:])[0])
