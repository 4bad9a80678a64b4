"""The optimisation schedule alone: zero/step decisions segment by segment."""

import pytest

from lightning_tbptt.schedule import Decision, OptimizationSchedule


def run_epoch(step_per: str, accumulate: int, segments_per_batch: list[int]) -> list[list[str]]:
    """Decide a whole epoch; Lightning's per-batch rule is derived as Lightning derives it."""
    schedule = OptimizationSchedule()
    out = []
    for b, k in enumerate(segments_per_batch):
        final = b == len(segments_per_batch) - 1
        batch = []
        for i in range(k):
            d = schedule.decide(
                step_per,
                i,
                k,
                accumulate_grad_batches=accumulate,
                batch_zeroes=b % accumulate == 0,
                batch_steps=(b + 1) % accumulate == 0 or final,
            )
            batch.append(("z" if d.zero_grad else "-") + ("S" if d.step else "."))
        out.append(batch)
    return out


def test_segment_mode_steps_after_every_segment():
    assert run_epoch("segment", 1, [3, 3]) == [["zS"] * 3] * 2


def test_segment_mode_accumulates_across_batches_and_flushes_where_lightning_steps():
    # groups of 3 segments across batches; Lightning steps after batch 3 (3 % 3 == 0), which closes a group of 2,
    # and after batch 4 (the last of the epoch)
    assert run_epoch("segment", 3, [2, 2, 1, 3]) == [["z.", "-."], ["-S", "z."], ["-S"], ["z.", "-.", "-S"]]


def test_batch_mode_zeroes_once_and_steps_once_per_accumulated_batch():
    assert run_epoch("batch", 1, [3, 2]) == [["z.", "-.", "-S"], ["z.", "-S"]]
    assert run_epoch("batch", 2, [2, 2, 2]) == [["z.", "-."], ["-.", "-S"], ["z.", "-S"]]


@pytest.mark.parametrize("accumulate", [1, 2, 3, 4])
@pytest.mark.parametrize("step_per", ["segment", "batch"])
def test_every_accumulation_starts_with_a_zero_and_ends_with_a_step_where_lightning_steps(step_per, accumulate):
    segments_per_batch = [3, 1, 4, 2, 5, 1, 2]
    decisions = run_epoch(step_per, accumulate, segments_per_batch)
    opened = False
    for b, batch in enumerate(decisions):
        for d in batch:
            if d[0] == "z":
                assert not opened, "zeroing would discard accumulated gradients"
                opened = True
            assert opened, "a backward without a zero before it (and after the previous step)"
            if d[1] == "S":
                opened = False
        if (b + 1) % accumulate == 0:
            assert not opened, "gradients left pending after a batch where Lightning steps"
    assert not opened, "gradients left without a step at the end of the epoch"


def test_accumulation_may_change_between_calls():
    schedule = OptimizationSchedule()
    kwargs = {"batch_zeroes": True, "batch_steps": False}
    assert schedule.decide("segment", 0, 9, accumulate_grad_batches=3, **kwargs) == Decision(True, False)
    # e.g. a GradientAccumulationScheduler lowered it: the accumulated segments are enough for a step
    assert schedule.decide("segment", 1, 9, accumulate_grad_batches=2, **kwargs) == Decision(False, True)
    assert schedule.decide("segment", 2, 9, accumulate_grad_batches=1, **kwargs) == Decision(True, True)
