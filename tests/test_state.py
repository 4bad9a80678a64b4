"""Carrying recurrent state across segments: the carrier alone, module discovery, and inside real fits."""

from typing import Any

import pytest
import torch
from torch import nn

from lightning_tbptt import ModelError, TBPTTCallback
from lightning_tbptt.state import StateCarrier, detach_state, find_recurrent_modules
from tests.helpers import (
    SequenceRegressor,
    fit_with_twin,
    make_loader,
    make_rnn,
    make_trainer,
    parameters_equal,
    reference_tbptt,
)

RNNS = {
    "lstm": {"cell": "lstm", "num_layers": 2, "batch_first": True},
    "gru": {"cell": "gru", "batch_first": True},
    "rnn": {"cell": "rnn", "batch_first": True},
    "lstm-proj_size": {"cell": "lstm", "hidden_size": 7, "proj_size": 3, "batch_first": True},
    "lstm-time-first": {"cell": "lstm", "batch_first": False},
}


def segments_forward(module: nn.Module, carrier: StateCarrier, x: torch.Tensor, cuts: list[int], time_dim: int) -> Any:
    outputs = []
    for start, stop in zip([0, *cuts], [*cuts, x.shape[time_dim]], strict=True):
        with carrier.segment():
            out, _ = module(x.narrow(time_dim, start, stop - start))
        outputs.append(out)
    return torch.cat(outputs, dim=time_dim)


@pytest.mark.parametrize("kind", list(RNNS), ids=list(RNNS))
def test_segments_with_carried_state_equal_one_forward_pass(kind):
    torch.manual_seed(0)
    kwargs = dict(RNNS[kind])
    module = make_rnn(kwargs.pop("cell"), **kwargs).double()
    time_dim = 1 if kwargs["batch_first"] else 0
    x = torch.randn(4, 11, 3, dtype=torch.float64)
    x = x if time_dim == 1 else x.transpose(0, 1)
    carrier = StateCarrier({"rnn": module})
    segmented = segments_forward(module, carrier, x, [4, 8], time_dim)
    full, _ = module(x)
    assert torch.allclose(segmented, full)


def test_carried_state_is_detached_contiguous_and_fresh():
    lstm = nn.LSTM(3, 4, batch_first=True)
    captured = []
    lstm.register_forward_hook(lambda m, a, out: captured.append(out[1]))
    carrier = StateCarrier({"lstm": lstm})
    with carrier.segment():
        lstm(torch.randn(2, 5, 3))
    h, c = carrier.carried["lstm"]
    assert h.grad_fn is None and c.grad_fn is None
    assert not h.requires_grad
    assert h.is_contiguous() and c.is_contiguous()
    assert captured[0][0].grad_fn is not None, "the returned state itself keeps its graph for this segment"
    assert torch.equal(h, captured[0][0])


def test_explicit_state_wins_positional_and_keyword():
    lstm = nn.LSTM(3, 4, batch_first=True)
    seen: list[Any] = []
    carrier = StateCarrier({"lstm": lstm})
    lstm.register_forward_hook(lambda m, a, k, out: seen.append(a[1] if len(a) > 1 else k.get("hx")), with_kwargs=True)
    x = torch.randn(2, 5, 3)
    zeros = (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    with carrier.segment():
        lstm(x)
    carried = carrier.carried["lstm"]
    with carrier.segment():
        lstm(x, zeros)
        lstm(x, hx=zeros)
        lstm(x, None)
        lstm(x, hx=None)
    assert seen[0] is None, "the first segment starts from the module's own zero state"
    assert seen[1] is zeros and seen[2] is zeros
    assert seen[3] is carried and seen[4] is carried, "every stateless call of a segment gets the carried state"


def test_carried_state_only_changes_between_segments_and_not_outside_them():
    gru = nn.GRU(3, 4)
    carrier = StateCarrier({"gru": gru})
    x = torch.randn(5, 2, 3)
    with carrier.segment():
        gru(x)
    first = carrier.carried["gru"]
    gru(x)  # outside a segment: no injection, no capture
    assert carrier.carried["gru"] is first
    with pytest.raises(RuntimeError, match="boom"), carrier.segment():
        gru(x)
        raise RuntimeError("boom")
    assert carrier.carried["gru"] is first, "a failed segment leaves the carried state as it was"
    carrier.reset()
    assert carrier.carried == {}
    carrier.remove()
    assert not gru._forward_hooks and not gru._forward_pre_hooks


def test_dropping_rows_restricts_the_carried_state_like_running_fewer_sequences():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, proj_size=2, batch_first=True).double()
    x = torch.randn(4, 9, 3, dtype=torch.float64)
    carrier = StateCarrier({"lstm": lstm})
    with carrier.segment(None, 4):
        lstm(x[:, :3])
    with carrier.segment(torch.tensor([0, 2, 3]), 3):
        lstm(x[[0, 2, 3], 3:6])
    with carrier.segment(torch.tensor([2]), 1):
        last, _ = lstm(x[[2], 6:9])
    full, _ = lstm(x[[2]])
    assert torch.allclose(last, full[:, 6:9])


def test_a_module_skipped_in_a_segment_is_restricted_from_the_rows_it_holds():
    torch.manual_seed(0)
    gru, other = nn.GRU(3, 4, batch_first=True).double(), nn.GRU(3, 4, batch_first=True).double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    carrier = StateCarrier({"gru": gru, "other": other})
    with carrier.segment(None, 4):
        gru(x[:, :2])
        other(x[:, :2])
    with carrier.segment(torch.tensor([1, 2, 3]), 3):
        gru(x[1:, 2:4])  # `other` is not called in this segment
    with carrier.segment(torch.tensor([3]), 1):
        out, _ = other(x[[3], 2:4])
    expected, _ = other(x[[3], :4])
    assert torch.allclose(out, expected[:, 2:4])


class LayeredCell(nn.Module):
    """A custom recurrent module that owns an LSTM: its state is (layers, B, H), not batch-first."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 5, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor, state: Any = None) -> Any:
        return self.lstm(x, state)


def test_custom_state_rows_are_found_by_size_and_ambiguity_is_an_error():
    cell = LayeredCell(layers=3)
    carrier = StateCarrier({"cell": cell})
    with carrier.segment(None, 2):
        cell(torch.zeros(2, 4, 3))
    with carrier.segment(torch.tensor([1]), 1):
        cell(torch.zeros(1, 4, 3))  # the only dimension of size 2 is dimension 1
    assert carrier.carried["cell"][0].shape == (3, 1, 5)

    cell = LayeredCell(layers=2)  # (2 layers, 2 sequences, 5): which dimension holds the sequences?
    carrier = StateCarrier({"cell": cell})
    with carrier.segment(None, 2):
        cell(torch.zeros(2, 4, 3))
    match = r"`cell`: expected exactly one dimension .* found dimensions \[0, 1\]"
    with pytest.raises(ModelError, match=match), carrier.segment(torch.tensor([1]), 1):
        pass


class DictStateCell(nn.Module):
    """A custom recurrent module with a nested state and a differently named state argument."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.GRUCell(3, 4)

    def forward(self, inputs: torch.Tensor, memory: dict[str, Any] | None = None) -> tuple[torch.Tensor, Any]:
        h = memory["h"][0] if memory is not None else inputs.new_zeros(inputs.shape[0], 4)
        outs = []
        for t in range(inputs.shape[1]):
            h = self.cell(inputs[:, t], h)
            outs.append(h)
        return torch.stack(outs, dim=1), {"h": [h], "steps": torch.tensor(inputs.shape[1])}


def test_custom_module_with_nested_state():
    torch.manual_seed(0)
    cell = DictStateCell().double()
    carrier = StateCarrier({"cell": cell})
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    segmented = segments_forward(cell, carrier, x, [3, 7], time_dim=1)
    full, _ = cell(x)
    assert torch.allclose(segmented, full)
    assert carrier.carried["cell"]["h"][0].grad_fn is None


def test_custom_module_without_state_argument_is_rejected_before_any_hook_is_added():
    lstm = nn.LSTM(2, 2)
    with pytest.raises(ModelError, match=r"`proj` \(Linear\).*forward\(input, state=None\)"):
        StateCarrier({"lstm": lstm, "proj": nn.Linear(2, 2)})
    assert not lstm._forward_hooks
    assert not lstm._forward_pre_hooks


def test_custom_module_that_does_not_return_a_pair_is_rejected():
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
            return x

    bad = Bad()
    carrier = StateCarrier({"bad": bad})
    match = r"`bad` \(Bad\) to return `\(output, new_state\)` but got Tensor\. .* remove 'bad' from `TBPTTCallback"
    with pytest.raises(ModelError, match=match), carrier.segment():
        bad(torch.zeros(1))


class Network(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.LSTM(3, 4)
        self.decoder = nn.ModuleDict({"rnn": nn.GRU(4, 4), "head": nn.Linear(4, 1)})
        self.custom = DictStateCell()
        self.custom.inner = nn.GRU(3, 4)


def test_find_recurrent_modules_rules():
    net = Network()
    # torch's RNNs and cells, wherever they are
    assert sorted(find_recurrent_modules(net)) == ["custom.cell", "custom.inner", "decoder.rnn", "encoder"]
    assert sorted(find_recurrent_modules(net, exclude=["decoder"])) == ["custom.cell", "custom.inner", "encoder"]
    # a module opted in owns the state of the recurrent modules inside it
    assert sorted(find_recurrent_modules(net, include=["custom"])) == ["custom", "decoder.rnn", "encoder"]


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_unknown_module_names_are_rejected(argument):
    name = "recurrent_modules" if argument == "include" else "exclude_modules"
    with pytest.raises(ModelError, match=rf"`{name}` to be a submodule of Network but got \['encodr'\]"):
        find_recurrent_modules(Network(), **{argument: ["encodr"]})


def test_a_module_both_carried_and_excluded_is_rejected():
    with pytest.raises(ModelError, match=r"not to overlap but \['custom'\] are both carried and excluded"):
        find_recurrent_modules(Network(), include=["custom"], exclude=["custom"])


def test_detach_state_handles_nested_collections():
    x = torch.ones(2, 3, requires_grad=True) * 3
    state = {"a": (x, [x.t()]), "b": None, "n": 3}
    detached = detach_state(state)
    assert detached["a"][0].grad_fn is None and detached["a"][1][0].is_contiguous()
    assert detached["b"] is None and detached["n"] == 3


class StateRecorder:
    """Records, for every call of a module during training, the state it received and the state it returned."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[Any, Any, bool]] = []
        module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        received = args[1] if len(args) > 1 else kwargs.get("hx")
        self.calls.append((received, output[1], module.training))


def test_state_entering_each_segment_is_the_state_leaving_the_previous_one(tmp_path):
    model = SequenceRegressor(num_layers=2).double()
    recorder = StateRecorder(model.rnn)
    make_trainer(tmp_path, [TBPTTCallback(5)]).fit(model, make_loader())
    calls = recorder.calls
    assert len(calls) == 3 * 5
    for i, (received, _, _) in enumerate(calls):
        if i % 5 == 0:
            assert received is None, "each batch starts from zeros"
            continue
        previous = calls[i - 1][1]
        for r, p in zip(received, previous, strict=True):
            assert r.grad_fn is None and not r.requires_grad
            assert torch.equal(r, p.detach())


class ExplicitZeroStateModel(SequenceRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        zeros = x.new_zeros(1, x.shape[0], self.rnn.hidden_size)
        out, _ = self.rnn(x, (zeros, zeros))
        return torch.nn.functional.mse_loss(self.head(out), y)


def test_model_passing_its_own_state_is_left_alone(tmp_path):
    with pytest.warns(UserWarning, match=r"carried no state into \['rnn'\].* pass `exclude_modules=\['rnn'\]`"):
        model, reference, loader, _ = fit_with_twin(
            tmp_path, lambda: ExplicitZeroStateModel().double(), [TBPTTCallback(5)]
        )
    reference_tbptt(reference, loader, segment_length=5, carry=False)
    assert parameters_equal(model, reference)


class ValidatingModel(SequenceRegressor):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])


def test_unsegmented_validation_inside_fit_gets_no_carried_state(tmp_path):
    model = ValidatingModel().double()
    recorder = StateRecorder(model.rnn)
    loader = make_loader()
    callback = TBPTTCallback(5, evaluate=False)
    trainer = make_trainer(tmp_path, [callback], limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, loader, loader)
    validation_calls = [received for received, _, training in recorder.calls if not training]
    assert len(validation_calls) == 1
    assert validation_calls == [None]


def test_excluded_module_starts_from_zeros_in_every_segment(tmp_path):
    callback = TBPTTCallback(5, exclude_modules=["rnn"])
    with pytest.warns(
        UserWarning, match=r"no recurrent module outside `exclude_modules=\['rnn'\]` in SequenceRegressor"
    ):
        model, reference, loader, _ = fit_with_twin(tmp_path, lambda: SequenceRegressor().double(), [callback])
    reference_tbptt(reference, loader, segment_length=5, carry=False)
    assert parameters_equal(model, reference)


class CustomCellModel(SequenceRegressor):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = DictStateCell()
        self.head = nn.Linear(4, 1)


def test_custom_module_opted_in_by_name_carries_its_state_in_a_fit(tmp_path):
    callback = TBPTTCallback(5, recurrent_modules=["rnn"])
    model, reference, loader, _ = fit_with_twin(tmp_path, lambda: CustomCellModel().double(), [callback])
    reference_tbptt(reference, loader, segment_length=5)
    assert parameters_equal(model, reference)

    # without opting in, only the GRU cell inside is found, and it is always given its state explicitly: no state is
    # carried (and the callback says so, naming the cell)
    with pytest.warns(UserWarning, match=r"carried no state into \['rnn.cell'\]: in every segment of the first batch"):
        model, reference, loader, _ = fit_with_twin(tmp_path, lambda: CustomCellModel().double(), [TBPTTCallback(5)])
    reference_tbptt(reference, loader, segment_length=5, carry=False)
    assert parameters_equal(model, reference)
