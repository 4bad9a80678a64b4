"""The optimisation schedule alone: zero/step decisions segment by segment."""

import pytest

from lightning_tbptt.schedule import Decision, OptimizationSchedule


def run_epoch(schedule: OptimizationSchedule, segments_per_batch: list[int]) -> list[list[str]]:
    """Decide a whole epoch; Lightning's per-batch rule is derived as Lightning derives it."""
    n = schedule.accumulate_grad_batches
    schedule.reset()
    out = []
    for b, k in enumerate(segments_per_batch):
        final = b == len(segments_per_batch) - 1
        batch = []
        for i in range(k):
            d = schedule.decide(i, k, batch_zeroes=b % n == 0, batch_steps=(b + 1) % n == 0 or final, final_batch=final)
            batch.append(("z" if d.zero_grad else "-") + ("S" if d.step else "."))
        out.append(batch)
    return out


def test_segment_mode_steps_after_every_segment():
    assert run_epoch(OptimizationSchedule("segment", 1), [3, 3]) == [["zS"] * 3] * 2


def test_segment_mode_accumulates_across_batches_and_flushes_at_the_end_of_the_epoch():
    decisions = run_epoch(OptimizationSchedule("segment", 3), [2, 2, 3])
    assert decisions == [["z.", "-."], ["-S", "z."], ["-.", "-S", "zS"]]


def test_batch_mode_zeroes_once_and_steps_once_per_accumulated_batch():
    assert run_epoch(OptimizationSchedule("batch", 1), [3, 2]) == [["z.", "-.", "-S"], ["z.", "-S"]]
    assert run_epoch(OptimizationSchedule("batch", 2), [2, 2, 2]) == [["z.", "-."], ["-.", "-S"], ["z.", "-S"]]


@pytest.mark.parametrize("accumulate", [1, 2, 3, 4])
@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_every_accumulation_starts_with_a_zero_and_ends_with_a_step(step_per, accumulate):
    decisions = [d for batch in run_epoch(OptimizationSchedule(step_per, accumulate), [3, 1, 4, 2, 5]) for d in batch]
    opened = False
    for d in decisions:
        if d[0] == "z":
            assert not opened, "zeroing would discard accumulated gradients"
            opened = True
        assert opened, "a backward without a zero before it (and after the previous step)"
        if d[1] == "S":
            opened = False
    assert not opened, "gradients left without a step at the end of the epoch"


def test_gradients_pending():
    schedule = OptimizationSchedule("segment", 2)
    assert schedule.gradients_pending is None, "before any segment, Lightning's own rule applies"
    assert schedule.decide(0, 1, batch_zeroes=True, batch_steps=False, final_batch=False) == Decision(True, False)
    assert schedule.gradients_pending is True
    schedule.decide(0, 1, batch_zeroes=False, batch_steps=True, final_batch=False)
    assert schedule.gradients_pending is False
    assert OptimizationSchedule("batch", 2).gradients_pending is None
