"""A carried state that is not finite: kept by default, or reset per row with a warning (``nonfinite_state``)."""

from typing import Any

import pytest
import torch

from lightning_tbptt import TBPTTCallback
from tests.helpers import loader_of, make_trainer, parameters_equal
from tests.test_evaluation import LaneEvaluated
from tests.test_streaming import SEGMENT, STEPS, fit_lanes, lane_batches

BAD_LANE, BAD_STEP = 1, 2  # in the first segment of the first batch


def poisoned() -> list[Any]:
    batches = lane_batches(starts=[])
    batches[0]["x"][BAD_LANE, BAD_STEP, 0] = float("nan")
    return batches


def predict(tmp_path: Any, batches: list[Any], **kwargs: Any) -> tuple[Any, torch.Tensor]:
    torch.manual_seed(0)
    model = LaneEvaluated().double()
    trainer = make_trainer(tmp_path, [TBPTTCallback(SEGMENT, streaming=True, **kwargs)])
    return model, torch.cat(trainer.predict(model, loader_of(batches)), dim=1)


def test_by_default_a_non_finite_state_poisons_its_lane_until_the_end(tmp_path):
    _, predicted = predict(tmp_path, poisoned())
    assert predicted[BAD_LANE, BAD_STEP:].isnan().all()
    others = [lane for lane in range(predicted.shape[0]) if lane != BAD_LANE]
    assert predicted[others].isfinite().all()


def test_reset_zeroes_only_that_lane_after_its_segment_and_names_it(tmp_path):
    batches = poisoned()
    with pytest.warns(UserWarning, match=r"Reset the carried state of rows \[1\] of predict batch 0 after its steps"):
        model, predicted = predict(tmp_path, batches, nonfinite_state="reset")
    assert predicted[BAD_LANE, BAD_STEP:SEGMENT].isnan().all(), "the segment with the bad step stays as computed"
    x = torch.cat([batch["x"] for batch in batches], dim=1)
    with torch.no_grad():
        whole = model(x)
        restarted = model(x[BAD_LANE : BAD_LANE + 1, SEGMENT:])  # the lane alone, from zeros after that segment
    assert torch.allclose(predicted[BAD_LANE, SEGMENT:], restarted[0])
    others = [lane for lane in range(x.shape[0]) if lane != BAD_LANE]
    assert torch.allclose(predicted[others], whole[others])


def test_reset_changes_nothing_while_every_state_is_finite(tmp_path, recwarn):
    batches = lane_batches()
    kept, _, _ = fit_lanes(tmp_path, TBPTTCallback(SEGMENT, streaming=True, resets="starts"), batches)
    reset, _, _ = fit_lanes(
        tmp_path, TBPTTCallback(SEGMENT, streaming=True, resets="starts", nonfinite_state="reset"), batches
    )
    assert parameters_equal(kept, reset, rtol=0, atol=0)
    assert not [w for w in recwarn if "Reset the carried state" in str(w.message)]
    assert STEPS > SEGMENT
