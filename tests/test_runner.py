"""The segment runner without a Trainer: plain functions stand for Lightning's part."""

from collections import OrderedDict
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

from lightning_tbptt import current_segment
from lightning_tbptt.errors import ModelError
from lightning_tbptt.plan import plan_segments
from lightning_tbptt.runner import Operations, SegmentRunner
from lightning_tbptt.schedule import Decision
from lightning_tbptt.state import StateCarrier
from lightning_tbptt.streams import Stream

B, T, H = 3, 10, 4


def setup(**operations: Any) -> tuple[nn.LSTM, SegmentRunner, torch.Tensor]:
    torch.manual_seed(0)
    lstm = nn.LSTM(2, H, batch_first=True).double()
    runner = SegmentRunner(StateCarrier({"lstm": lstm}), Operations(**operations))
    return lstm, runner, torch.randn(B, T, 2, dtype=torch.float64)


def test_training_segments_carry_the_state_and_equal_one_forward_pass():
    lstm, runner, x = setup()
    calls: list[tuple[int, int, Decision | None, int]] = []

    def run_segment(kwargs: "OrderedDict[str, Any]", decision: Decision | None, weight: int) -> dict[str, Any]:
        segment = current_segment()
        calls.append((segment.index, segment.count, decision, weight))
        out, _ = lstm(kwargs["batch"])
        outputs.append(out)
        return {"out": out}

    outputs: list[torch.Tensor] = []
    stream = Stream("train")
    with torch.no_grad():
        ran = runner.train(plan_segments(x, 4), OrderedDict(batch=x), stream, run_segment)
        expected, _ = lstm(x)  # the reference: the whole sequence in one call
    assert torch.allclose(torch.cat(outputs, dim=1), expected)
    assert ran.output["out"] is outputs[-1]
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3)]
    assert [c[3] for c in calls] == [B * 4, B * 4, B * 2]  # each segment's valid steps weight its logged values
    assert (ran.index, ran.decision) == (2, None)
    assert runner.segments_run == 3
    assert set(stream.state.carried) == {"lstm"}  # what the next batch of the stream would start from


def test_decisions_are_asked_per_step_and_a_stop_ends_the_batch():
    lstm, runner, x = setup(stopped=lambda: len(seen) == 2)
    seen: list[Decision | None] = []

    def run_segment(kwargs: Any, decision: Decision | None, weight: int) -> dict[str, Any]:
        seen.append(decision)
        lstm(kwargs["batch"])
        return {}

    decide = lambda index: Decision(zero_grad=index == 0, step=True)  # noqa: E731
    ran = runner.train(plan_segments(x, 4), OrderedDict(batch=x), Stream("train"), run_segment, decide=decide)
    assert seen == [Decision(True, True), Decision(False, True)]
    assert ran.index == 1  # stopped after the second of three segments


def test_burn_in_runs_without_gradient_silenced_and_is_not_a_step():
    events: list[str] = []

    @contextmanager
    def silenced() -> Any:
        events.append("silenced")
        yield

    def step_without_gradient(kwargs: Any) -> None:
        events.append(f"burn-in grad={torch.is_grad_enabled()} burn_in={current_segment().burn_in}")
        lstm(kwargs["batch"])

    lstm, runner, x = setup(silenced=silenced, step_without_gradient=step_without_gradient)
    stream = Stream("train")

    def run_segment(kwargs: Any, decision: Any, weight: int) -> dict[str, Any]:
        segment = current_segment()
        events.append(f"step {segment.index}/{segment.count} start={segment.start}")
        lstm(kwargs["batch"])
        return {}

    plan = plan_segments(x, 4, burn_in=3)
    ran = runner.train(plan, OrderedDict(batch=x), stream, run_segment)
    assert events == [
        "silenced",
        "burn-in grad=False burn_in=True",
        "step 1/3 start=3",
        "step 2/3 start=7",
    ]
    assert ran.index == 1  # two training steps
    assert runner.segments_run == 2


def test_a_process_with_fewer_segments_takes_part_in_the_others_steps_idle():
    idle = []

    @contextmanager
    def idle_step() -> Any:
        idle.append(True)
        yield

    lstm, runner, x = setup(idle=idle_step)
    seen: list[tuple[Any, int, int, int]] = []

    def run_segment(kwargs: Any, decision: Any, weight: int) -> dict[str, Any]:
        segment = current_segment()
        seen.append((None if kwargs["batch"] is None else "batch", segment.index, segment.count, weight))
        if kwargs["batch"] is not None:
            lstm(kwargs["batch"])
        return {}

    ran = runner.train(plan_segments(x, 5), OrderedDict(batch=x), Stream("train"), run_segment, total=4)
    assert seen == [("batch", 0, 4, B * 5), ("batch", 1, 4, B * 5), (None, 2, 4, 0), (None, 3, 4, 0)]
    assert idle == [True, True]
    assert ran.index == 3


def test_lightning_1x_hiddens_are_threaded_detached_from_one_segment_into_the_next():
    _, runner, x = setup()
    runner.takes_hiddens = True
    given = []

    def run_segment(kwargs: Any, decision: Any, weight: int) -> dict[str, Any]:
        given.append(kwargs["hiddens"])
        return {"loss": torch.zeros(()), "hiddens": torch.ones(1, requires_grad=True) * len(given)}

    runner.train(plan_segments(x, 4), OrderedDict(batch=x), Stream("train"), run_segment)
    assert given[0] is None
    assert [h.item() for h in given[1:]] == [1.0, 2.0]
    assert all(not h.requires_grad for h in given[1:])
    with pytest.raises(ModelError, match="return a dict with the key 'hiddens' but segment 0 returned the keys"):
        runner.train(plan_segments(x, 4), OrderedDict(batch=x), Stream("train"), lambda k, d, w: {"loss": 1})


def test_evaluation_segments_are_joined_weighted_and_burn_in_is_silenced():
    weights: list[int] = []
    silenced: list[bool] = []

    @contextmanager
    def weighted(weight: int) -> Any:
        weights.append(weight)
        yield

    @contextmanager
    def silence() -> Any:
        silenced.append(current_segment().burn_in)
        yield

    lstm, runner, x = setup(weighted=weighted, silenced=silence)

    def step(batch: torch.Tensor, batch_idx: int) -> dict[str, Any]:
        out, _ = lstm(batch)
        return {"out": out, "idx": batch_idx}

    with torch.no_grad():
        plan = plan_segments(x, 4, burn_in=2, whole_burn_in=True)
        joined = runner.evaluate(plan, step, (7,), {}, Stream("eval"))
        expected, _ = lstm(x)
    assert torch.allclose(joined["out"][:, 2:], expected[:, 2:])  # the burn-in steps are run: the state is exact
    assert joined["idx"] == 7
    assert weights == [0, B * 4, B * 4]  # a burn-in segment counts no step
    assert silenced == [True]


def test_a_failing_segment_leaves_the_carried_state_as_it_was():
    lstm, runner, x = setup()
    stream = Stream("train")
    runner.train(plan_segments(x, 5), OrderedDict(batch=x), stream, lambda k, d, w: lstm(k["batch"]) and {})
    before = stream.state.carried["lstm"]

    def failing(kwargs: Any, decision: Any, weight: int) -> dict[str, Any]:
        lstm(kwargs["batch"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        runner.train(plan_segments(x, 5), OrderedDict(batch=x), stream, failing)
    assert stream.state.carried["lstm"] is before


def test_exact_runs_a_first_pass_then_recomputes_in_reverse_with_the_gradient_of_the_whole_batch():
    """``train_exact`` with plain functions: the step is ``(lstm(x) ** 2).mean()``, backward runs in ``run_segment``."""
    changes: list[Any] = []
    events: list[str] = []

    @contextmanager
    def recomputed(change: Any) -> Any:
        events.append("recomputing")
        changes.append(change)
        yield
        changes.pop()

    def step(kwargs: Any) -> torch.Tensor:
        segment = current_segment()
        events.append(f"{segment.index} grad={torch.is_grad_enabled()} recomputing={segment.recomputing}")
        out, _ = lstm(kwargs["batch"])
        return (out**2).mean()

    lstm, runner, x = setup(step_logged=step, recomputed=recomputed)

    def run_segment(kwargs: Any, decision: Decision | None, weight: int) -> dict[str, Any]:
        loss = changes[-1](step(kwargs))  # as the shadowed training_step returns it
        (loss * 0.5).backward()  # a factor of the backward path (a loss scale, 1/N) applies once per segment
        return {"loss": loss.detach()}

    stream = Stream("train")
    ran = runner.train_exact(plan_segments(x, 4), OrderedDict(batch=x), stream, run_segment)
    grads = [p.grad.clone() for p in lstm.parameters()]
    # the reference: the three segments with their graph kept, one backward of the summed losses
    state, total = None, 0.0
    for start in range(0, T, 4):
        out, state = lstm(x[:, start : start + 4], state)
        last = (out**2).mean()
        total = total + last
    expected = torch.autograd.grad(total * 0.5, list(lstm.parameters()))
    assert all(torch.allclose(g, e, rtol=0, atol=1e-14) for g, e in zip(grads, expected, strict=True))
    assert events == [
        *(f"{i} grad=False recomputing=False" for i in range(3)),
        *(event for i in reversed(range(3)) for event in ("recomputing", f"{i} grad=True recomputing=True")),
    ]
    assert torch.allclose(ran.output["loss"], last.detach(), rtol=0, atol=1e-14)  # the batch's last segment's
    assert (ran.index, runner.segments_run) == (2, 3)
    # the state carried on is the first pass's, detached
    assert torch.allclose(stream.state.carried["lstm"][0], state[0].detach(), rtol=0, atol=1e-14)
    assert not stream.state.carried["lstm"][0].requires_grad


def test_exact_carries_the_gradient_across_a_segment_in_which_a_module_is_not_called():
    torch.manual_seed(0)
    lstm, gru = nn.LSTM(2, H, batch_first=True).double(), nn.GRU(2, H, batch_first=True).double()
    changes: list[Any] = []

    @contextmanager
    def recomputed(change: Any) -> Any:
        changes.append(change)
        yield
        changes.pop()

    def step(kwargs: Any) -> torch.Tensor:
        x = kwargs["batch"]
        loss = (lstm(x)[0] ** 2).mean()
        if current_segment().index != 1:  # the GRU skips the middle segment: its state crosses it unchanged
            loss = loss + (gru(x)[0] ** 2).mean()
        return loss

    def run_segment(kwargs: Any, decision: Decision | None, weight: int) -> dict[str, Any]:
        changes[-1](step(kwargs)).backward()
        return {}

    carrier = StateCarrier({"lstm": lstm, "gru": gru})
    runner = SegmentRunner(carrier, Operations(step_logged=step, recomputed=recomputed))
    x = torch.randn(B, T, 2, dtype=torch.float64)
    runner.train_exact(plan_segments(x, 4), OrderedDict(batch=x), Stream("train"), run_segment)
    parameters = [*lstm.parameters(), *gru.parameters()]
    grads = [p.grad.clone() for p in parameters]

    def reference(cut: bool) -> tuple[torch.Tensor, ...]:
        lstm_state = gru_state = None
        total = 0.0
        for index, start in enumerate(range(0, T, 4)):
            piece = x[:, start : start + 4]
            out, lstm_state = lstm(piece, lstm_state)
            total = total + (out**2).mean()
            if index != 1:
                if cut and gru_state is not None:
                    gru_state = gru_state.detach()
                out, gru_state = gru(piece, gru_state)
                total = total + (out**2).mean()
        return torch.autograd.grad(total, parameters)

    expected = reference(cut=False)
    assert all(torch.allclose(g, e, rtol=0, atol=1e-14) for g, e in zip(grads, expected, strict=True))
    # the control: had the GRU's gradient stopped at the segment that skips it, its parameters' would differ
    cut = reference(cut=True)
    assert not all(torch.allclose(g, e, rtol=0, atol=1e-10) for g, e in zip(grads, cut, strict=True))
