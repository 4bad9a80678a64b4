"""The callback equals a plain hand-written PyTorch TBPTT loop, parameter for parameter."""

from typing import Any

import pytest
import torch

from lightning_tbptt import TBPTTCallback
from tests.helpers import (
    SequenceRegressor,
    fit_with_twin,
    make_loader,
    make_trainer,
    max_difference,
    parameters_equal,
    reference_full_bptt,
    reference_tbptt,
    twin,
)

ARCHITECTURES = {
    "lstm-2-layers": {"cell": "lstm", "num_layers": 2},
    "gru": {"cell": "gru"},
    "rnn": {"cell": "rnn"},
    "lstm-proj_size": {"cell": "lstm", "hidden_size": 7, "proj_size": 4},
    "gru-2-layers-time-first": {"cell": "gru", "num_layers": 2, "batch_first": False},
}


def fit_and_compare(
    tmp_path: Any,
    model_kwargs: dict[str, Any],
    *,
    segment_length: int,
    epochs: int = 2,
    step_per: str = "segment",
    accumulate: int = 1,
    clip: float | None = None,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = SequenceRegressor(**model_kwargs).double()
    reference = twin(model)
    batch_first = model_kwargs.get("batch_first", True)
    time_dim = 1 if batch_first else 0
    loader = make_loader(batch_first=batch_first)
    callback = TBPTTCallback(segment_length, time_dim=time_dim, step_per=step_per)
    trainer = make_trainer(
        tmp_path, [callback], max_epochs=epochs, accumulate_grad_batches=accumulate, gradient_clip_val=clip
    )
    trainer.fit(model, loader)
    counts = reference_tbptt(
        reference,
        loader,
        segment_length=segment_length,
        epochs=epochs,
        step_per=step_per,
        accumulate=accumulate,
        clip=clip,
        time_dim=time_dim,
    )
    assert parameters_equal(model, reference), max_difference(model, reference)
    assert trainer.global_step == counts["steps"]
    return counts


@pytest.mark.parametrize("architecture", list(ARCHITECTURES), ids=list(ARCHITECTURES))
def test_architectures_equal_reference_with_ragged_last_segment(tmp_path, architecture):
    # 23 steps in segments of 5: four full segments and a ragged one of 3
    counts = fit_and_compare(tmp_path, ARCHITECTURES[architecture], segment_length=5)
    assert counts["steps"] == 2 * 3 * 5


@pytest.mark.parametrize("step_per", ["segment", "batch"])
@pytest.mark.parametrize("accumulate", [1, 2, 3], ids=lambda n: f"accumulate={n}")
def test_stepping_modes_and_accumulation_equal_reference(tmp_path, step_per, accumulate):
    counts = fit_and_compare(tmp_path, {"num_layers": 2}, segment_length=5, step_per=step_per, accumulate=accumulate)
    # 3 batches of 5 segments per epoch, 2 epochs
    expected = {
        ("segment", 1): 30,
        ("segment", 2): 16,
        ("segment", 3): 10,
        ("batch", 1): 6,
        ("batch", 2): 4,
        ("batch", 3): 2,
    }
    assert counts["steps"] == expected[(step_per, accumulate)]


@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_gradient_clipping_applies_per_step(tmp_path, step_per):
    counts = fit_and_compare(tmp_path, {"cell": "gru"}, segment_length=4, step_per=step_per, accumulate=2, clip=0.05)
    assert counts["largest_norm"] > 0.05, "the clip value must be small enough to change the result"


@pytest.mark.parametrize("segment_length", [23, 100], ids=["equal-to-T", "longer-than-T"])
@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_segment_as_long_as_the_sequence_is_full_bptt(tmp_path, segment_length, step_per):
    callback = TBPTTCallback(segment_length, step_per=step_per)
    model, reference, loader, trainer = fit_with_twin(
        tmp_path, lambda: SequenceRegressor(num_layers=2).double(), [callback], max_epochs=2
    )
    steps = reference_full_bptt(reference, loader, epochs=2)
    assert trainer.global_step == steps == 6
    assert parameters_equal(model, reference)


def test_step_per_batch_equals_summed_segment_losses_with_one_backward(tmp_path):
    """The seed-blog semantics: sum the segment losses of a batch, one backward, one step."""
    callback = TBPTTCallback(5, step_per="batch")
    model, reference, loader, _ = fit_with_twin(tmp_path, lambda: SequenceRegressor().double(), [callback])

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        state, total = None, 0
        for start in range(0, x.shape[1], 5):
            out, state = reference.rnn(x[:, start : start + 5], state)
            total = total + torch.nn.functional.mse_loss(reference.head(out), y[:, start : start + 5])
            state = tuple(s.detach() for s in state)
        total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert parameters_equal(model, reference)


def test_without_carrying_the_state_the_result_differs(tmp_path):
    """Guard: the reference comparison is sensitive to the carried state."""
    model, reference, loader, _ = fit_with_twin(tmp_path, lambda: SequenceRegressor().double(), [TBPTTCallback(5)])
    reference_tbptt(reference, loader, segment_length=5, carry=False)
    assert not parameters_equal(model, reference)


def _bf16_lstm_runs_on_this_cpu() -> bool:
    """oneDNN's bfloat16 LSTM needs CPU instructions that not every x86 machine has."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(2, 2)(torch.zeros(1, 1, 2))
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _bf16_lstm_runs_on_this_cpu(), reason="this CPU has no bfloat16 LSTM in oneDNN")
def test_bf16_mixed_precision_on_cpu_matches_autocast_reference(tmp_path):
    torch.manual_seed(0)
    model = SequenceRegressor(log=False)
    reference = twin(model)
    loader = make_loader(dtype=torch.float32)
    trainer = make_trainer(tmp_path, [TBPTTCallback(5)], precision="bf16-mixed")
    trainer.fit(model, loader)

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for x, y in loader:
        state = None
        for start in range(0, x.shape[1], 5):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, state = reference.rnn(x[:, start : start + 5], state)
                loss = torch.nn.functional.mse_loss(reference.head(out), y[:, start : start + 5])
            loss.backward()
            state = tuple(s.detach() for s in state)
            optimizer.step()
            optimizer.zero_grad()
    assert trainer.global_step == 15
    assert parameters_equal(model, reference)
