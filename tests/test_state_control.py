"""Reading, resetting and setting the carried state from outside; evaluation from the training state; ``Stepper``."""

from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_tbptt import ConfigurationError, ModelError, Stepper, TBPTTCallback
from lightning_tbptt.state import detach_state
from tests.helpers import LR, MOMENTUM, loader_of, make_trainer, parameters_equal, twin
from tests.state_kinds import KindRegressor, call, recurrent_modules
from tests.test_streaming import LaneRegressor, lane_batches

SEGMENT = 5


def reference_stream(model: Any, batches: list[Any], *, reset_at: dict[int, list[int]], start: Any = None) -> Any:
    """The oracle: the LSTM's state passed by hand across segments and batches, the lanes of ``reset_at[b]`` zeroed
    before batch ``b``; returns the state after the last segment."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    state = start
    for b, batch in enumerate(batches):
        if b in reset_at and state is not None:
            h, c = (s.clone() for s in state)
            h[:, reset_at[b]] = 0
            c[:, reset_at[b]] = 0
            state = (h, c)
        for begin in range(0, batch["x"].shape[1], SEGMENT):
            piece = slice(begin, begin + SEGMENT)
            out, state = model.rnn(batch["x"][:, piece], state)
            F.mse_loss(model.head(out), batch["y"][:, piece]).backward()
            state = detach_state(state)
            optimizer.step()
            optimizer.zero_grad()
    return state


class Controls(pl.Callback):
    """Resets or sets the training stream's state before given batches."""

    def __init__(self, tbptt: TBPTTCallback, before: dict[int, Any]) -> None:
        self.tbptt, self.before = tbptt, before
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        action = self.before.get(batch_idx)
        if action == "all":
            self.tbptt.reset_state()
        elif isinstance(action, list) or (isinstance(action, torch.Tensor) and action.dtype == torch.bool):
            self.tbptt.reset_state(action)
        elif action is not None:
            self.tbptt.set_state(action)
        self.seen.append({k: tuple(t.clone() for t in v) for k, v in self.tbptt.carried_state().items()})


def no_resets() -> list[Any]:
    return [{key: value for key, value in batch.items() if key != "starts"} for batch in lane_batches([])]


@pytest.mark.parametrize(
    ("before", "reset_at"),
    [
        ({1: [0, 2]}, {1: [0, 2]}),
        ({1: torch.tensor([True, False, False, True])}, {1: [0, 3]}),
        ({2: "all"}, {2: [0, 1, 2, 3]}),
    ],
    ids=["lanes", "mask", "all"],
)
def test_resetting_lanes_between_batches_equals_the_loop_that_zeroes_them(tmp_path, before, reset_at):
    torch.manual_seed(0)
    model = LaneRegressor(log=False).double()
    expected = twin(model)
    batches = no_resets()
    tbptt = TBPTTCallback(SEGMENT, streaming=True)
    controls = Controls(tbptt, before)
    make_trainer(tmp_path, [tbptt, controls]).fit(model, loader_of(batches))
    final = reference_stream(expected, batches, reset_at=reset_at)
    assert parameters_equal(model, expected)
    assert controls.seen[0] == {}  # nothing carried before the first batch
    for got, want in zip(tbptt.carried_state()["rnn"], final, strict=True):  # after the fit: the last state
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    # and without the reset, another result
    torch.manual_seed(0)
    plain = LaneRegressor(log=False).double()
    make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True)]).fit(plain, loader_of(batches))
    assert not parameters_equal(plain, model)


def test_setting_the_state_equals_the_loop_that_starts_from_it(tmp_path):
    torch.manual_seed(0)
    model = LaneRegressor(log=False).double()
    expected = twin(model)
    batches = no_resets()
    start = tuple(torch.randn(1, 4, 6, dtype=torch.float64) for _ in range(2))
    tbptt = TBPTTCallback(SEGMENT, streaming=True)
    make_trainer(tmp_path, [tbptt, Controls(tbptt, {0: {"rnn": start}})]).fit(model, loader_of(batches))
    reference_stream(expected, batches, reset_at={}, start=start)
    assert parameters_equal(model, expected)


def test_state_control_outside_a_fit_and_bad_values_are_refused(tmp_path):
    tbptt = TBPTTCallback(SEGMENT, streaming=True)
    with pytest.raises(ConfigurationError, match=r"`TBPTTCallback.reset_state` works on the training stream of a"):
        tbptt.reset_state()
    with pytest.raises(ConfigurationError, match=r"`TBPTTCallback.set_state` works on the training stream"):
        tbptt.set_state({})
    with pytest.raises(ConfigurationError, match=r"Expected `TBPTTCallback\(streaming=True\)` for `evaluate_from`"):
        TBPTTCallback(SEGMENT).evaluate_from("train")
    with pytest.raises(ConfigurationError, match=r"Expected `evaluate_from` to get 'train', a mapping .* got 'last'"):
        tbptt.evaluate_from("last")  # type: ignore[arg-type]
    assert tbptt.carried_state() == {}

    class Bad(pl.Callback):
        def __init__(self, action: Any) -> None:
            self.action = action

        def on_train_batch_start(self, *args: Any) -> None:
            self.action()

    for action, message in [
        (
            lambda: tbptt.reset_state([7]),
            r"Expected `lanes` to list rows of the training stream, 0 to 3, but got \[7\]",
        ),
        (lambda: tbptt.set_state({"gru": 1}), r"Expected `set_state` to get the states of carried modules, \['rnn'\]"),
        (lambda: tbptt.set_state({"rnn": torch.zeros(4, 6)}), r"carried state of `rnn` \(LSTM\) to be a tuple of 2"),
        (lambda: tbptt.reset_state(torch.tensor([True])), r"boolean `lanes` mask to have one entry per lane .* \(4\)"),
    ]:
        torch.manual_seed(0)
        with pytest.raises(ConfigurationError, match=message):
            calls = {"n": 0}

            def second(action: Any = action, calls: Any = calls) -> None:
                calls["n"] += 1
                if calls["n"] == 2:  # (after the first batch: the lanes are known)
                    action()

            make_trainer(tmp_path, [tbptt, Bad(second)]).fit(LaneRegressor(log=False).double(), loader_of(no_resets()))


class Predicting(LaneRegressor):
    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch["x"])


def test_prediction_continues_from_the_training_streams_last_state(tmp_path):
    torch.manual_seed(0)
    model = Predicting(log=False).double()
    batches = no_resets()
    tbptt = TBPTTCallback(SEGMENT, streaming=True)
    trainer = make_trainer(tmp_path, [tbptt])
    trainer.fit(model, loader_of(batches))
    final = tbptt.carried_state()["rnn"]
    follow = [{"x": torch.randn(4, 7, 3, dtype=torch.float64), "y": torch.zeros(4, 7, 1, dtype=torch.float64)}]
    tbptt.evaluate_from("train")
    (predicted,) = trainer.predict(model, loader_of(follow))
    with torch.no_grad():
        expected = model.head(model.rnn(follow[0]["x"], final)[0])
        from_zeros = model.head(model.rnn(follow[0]["x"])[0])
    assert torch.allclose(predicted, expected, rtol=0, atol=1e-12)
    assert not torch.allclose(predicted, from_zeros)
    tbptt.evaluate_from(None)
    (again,) = trainer.predict(model, loader_of(follow))
    assert torch.allclose(again, from_zeros, rtol=0, atol=1e-12)
    # a given state
    given = tuple(torch.randn_like(s) for s in final)
    tbptt.evaluate_from({"rnn": given})
    (predicted,) = trainer.predict(model, loader_of(follow))
    with torch.no_grad():
        assert torch.allclose(predicted, model.head(model.rnn(follow[0]["x"], given)[0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm-cell-loop", "min-gru", "memory-attention", "named-output"])
def test_a_stepper_generates_as_the_hand_written_step_loop(kind):
    torch.manual_seed(0)
    model = KindRegressor(kind).double()
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with torch.no_grad():
        state, expected = None, []
        for t in range(9):
            out, state = call(kind, model.rnn, x[:, t : t + 1], state)
            expected.append(model.head(out))
        with Stepper(model, recurrent_modules=recurrent_modules(kind)) as step:
            got = [step(x[:, t : t + 1]) for t in range(9)]
            assert set(step.state) == {"rnn"}
            step.reset()
            assert step.state == {}
    assert torch.allclose(torch.cat(got, dim=1), torch.cat(expected, dim=1), rtol=0, atol=1e-12)
    assert not model.rnn._forward_hooks  # closed: unhooked


def test_state_control_needs_streaming_and_evaluate_from_checks_its_names(tmp_path):
    plain = TBPTTCallback(SEGMENT)

    class Sets(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            plain.set_state({})

    with pytest.raises(ConfigurationError, match=r"Expected `TBPTTCallback\(streaming=True\)` for `set_state`"):
        make_trainer(tmp_path, [plain, Sets()]).fit(LaneRegressor(log=False).double(), loader_of(no_resets()))
    tbptt = TBPTTCallback(SEGMENT, streaming=True)
    trainer = make_trainer(tmp_path, [tbptt])
    model = Predicting(log=False).double()
    trainer.fit(model, loader_of(no_resets()))
    tbptt.evaluate_from({"gru": torch.zeros(1)})
    with pytest.raises(ConfigurationError, match=r"Expected `evaluate_from` to get the states of carried modules"):
        trainer.predict(model, loader_of(no_resets()))


def test_a_stepper_starts_from_a_given_state_and_refuses_a_model_without_recurrence():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    start = tuple(torch.randn(1, 2, 4, dtype=torch.float64) for _ in range(2))
    with torch.no_grad(), Stepper(lstm, state={"lstm": start}) as step:
        assert torch.allclose(step(x)[0], lstm(x, start)[0], rtol=0, atol=1e-12)
        with pytest.raises(ConfigurationError, match=r"Expected the states of carried modules, \['lstm'\]"):
            step.set_state({"gru": start})
    with pytest.raises(ModelError, match=r"Expected Linear to have a recurrent module to carry"):
        Stepper(torch.nn.Linear(2, 2))
    with pytest.raises(ModelError, match=r"to be a submodule of LSTM but got \['rnn'\]"):
        Stepper(lstm, recurrent_modules=["rnn"])
