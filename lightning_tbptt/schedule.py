"""The optimisation schedule: when gradients are zeroed and when the optimizer steps, segment by segment.

Two stepping modes, each combined with ``Trainer(accumulate_grad_batches=N)``:

``step_per="segment"`` (classic TBPTT)
    Gradients of ``N`` consecutive segments are accumulated, then the optimizer steps. Segments are counted through
    the whole epoch, across batch boundaries; the last segment of the epoch always steps (as Lightning always steps
    on the last batch). With ``N=1`` the optimizer steps after every segment.

``step_per="batch"``
    Gradients of all segments of ``N`` consecutive batches are accumulated, then the optimizer steps once. This is
    Lightning's own per-batch rule, with the segments of a batch summed as if their losses had been added up before
    one backward; each segment is still backpropagated as soon as it is done, so memory stays that of one segment.

In both modes Lightning divides every loss by ``N``, so a step applies the mean over the accumulated groups.

Example:
    >>> schedule = OptimizationSchedule("segment", accumulate_grad_batches=2)
    >>> [schedule.decide(i, 3, batch_zeroes=True, batch_steps=True, final_batch=False) for i in range(3)]
    [Decision(zero_grad=True, step=False), Decision(zero_grad=False, step=True), Decision(zero_grad=True, step=False)]
    >>> schedule.gradients_pending
    True
    >>> schedule = OptimizationSchedule("batch", accumulate_grad_batches=1)
    >>> [schedule.decide(i, 3, batch_zeroes=True, batch_steps=True, final_batch=False) for i in range(3)]
    [Decision(zero_grad=True, step=False), Decision(zero_grad=False, step=False), Decision(zero_grad=False, step=True)]

"""

from typing import Literal, NamedTuple

StepPer = Literal["segment", "batch"]
STEP_PER_CHOICES: tuple[StepPer, ...] = ("segment", "batch")


class Decision(NamedTuple):
    """What happens around one segment's backward pass."""

    zero_grad: bool
    """Zero the gradients before this segment's backward."""
    step: bool
    """Run the optimizer step (with clipping and its hooks) after this segment's backward."""


class OptimizationSchedule:
    """Decides, segment by segment, when gradients are zeroed and when the optimizer steps.

    Args:
        step_per: ``"segment"`` or ``"batch"`` (see the module documentation).
        accumulate_grad_batches: The ``Trainer``'s ``accumulate_grad_batches``.

    """

    def __init__(self, step_per: StepPer, accumulate_grad_batches: int) -> None:
        self.step_per = step_per
        self.accumulate_grad_batches = accumulate_grad_batches
        self._accumulated = 0
        self._started = False

    def reset(self) -> None:
        """Start a new epoch: no segment is accumulated."""
        self._accumulated = 0
        self._started = False

    def decide(
        self, index: int, num_segments: int, *, batch_zeroes: bool, batch_steps: bool, final_batch: bool
    ) -> Decision:
        """Return the decision for segment ``index`` of a batch of ``num_segments`` segments.

        Args:
            index: Index of the segment in its batch.
            num_segments: Number of segments of the batch.
            batch_zeroes: Whether Lightning zeroes the gradients for this batch (first batch of an accumulation).
            batch_steps: Whether Lightning steps the optimizer after this batch (last batch of an accumulation).
            final_batch: Whether this is the last batch of the epoch.

        """
        self._started = True
        last = index == num_segments - 1
        if self.step_per == "batch":
            return Decision(zero_grad=index == 0 and batch_zeroes, step=last and batch_steps)
        zero_grad = self._accumulated == 0
        step = self._accumulated + 1 == self.accumulate_grad_batches or (last and final_batch)
        self._accumulated = 0 if step else self._accumulated + 1
        return Decision(zero_grad=zero_grad, step=step)

    @property
    def gradients_pending(self) -> bool | None:
        """Whether accumulated gradients await a step after the last decided segment.

        ``None`` when the schedule leaves this to Lightning's per-batch rule: in ``"batch"`` mode, and before the
        first segment of an epoch.

        """
        if self.step_per == "batch" or not self._started:
            return None
        return self._accumulated > 0
