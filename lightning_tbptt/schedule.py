"""The optimisation schedule: when gradients are zeroed and when the optimizer steps, segment by segment.

Lightning decides gradient accumulation per batch: with ``Trainer(accumulate_grad_batches=N)`` it steps after every
``N``-th batch and after the last batch of the epoch, and everything else it does once per batch (stepping LR
schedulers, advancing the logger's step, zeroing gradients before validation, ``trainer.estimated_stepping_batches``)
follows that rule. The schedule keeps that rule for batches and adds one for segments:

``step_per="segment"`` (classic TBPTT)
    The optimizer steps after every ``N`` segments, counted through the epoch across batch boundaries, and also after
    the last segment of every batch after which Lightning steps. So no gradient is left pending when Lightning
    considers a step done. With ``N=1`` the optimizer steps after every segment.

``step_per="batch"``
    Exactly Lightning's per-batch rule: gradients of all segments of a batch are accumulated, as if the segment
    losses had been summed before one backward (but at the memory of one segment, since each segment is
    backpropagated as soon as it is done), and the optimizer steps after the last segment of every batch after which
    Lightning steps.

In both modes Lightning divides every loss by ``N``, so a step applies the mean over the accumulated groups.

Example:
    >>> schedule = OptimizationSchedule()
    >>> [schedule.decide("segment", i, 3, accumulate_grad_batches=2, batch_zeroes=True, batch_steps=False)
    ...  for i in range(3)]
    [Decision(zero_grad=True, step=False), Decision(zero_grad=False, step=True), Decision(zero_grad=True, step=False)]
    >>> [schedule.decide("batch", i, 3, accumulate_grad_batches=1, batch_zeroes=True, batch_steps=True)
    ...  for i in range(3)]
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

    It counts the segments accumulated since the last step (through the epoch, across batches).

    """

    def __init__(self) -> None:
        self._accumulated = 0

    def reset(self) -> None:
        """Start a new epoch: no segment is accumulated."""
        self._accumulated = 0

    @property
    def accumulated(self) -> int:
        """Segments whose gradients were accumulated since the last optimizer step."""
        return self._accumulated

    @accumulated.setter
    def accumulated(self, value: int) -> None:
        self._accumulated = value

    def decide(
        self,
        step_per: StepPer,
        index: int,
        num_segments: int,
        *,
        accumulate_grad_batches: int,
        batch_zeroes: bool,
        batch_steps: bool,
    ) -> Decision:
        """Return the decision for segment ``index`` of a batch of ``num_segments`` segments.

        Args:
            step_per: ``"segment"`` or ``"batch"`` (see the module documentation).
            index: Index of the segment in its batch.
            num_segments: Number of segments of the batch.
            accumulate_grad_batches: The ``Trainer``'s current ``accumulate_grad_batches`` (it may change per epoch).
            batch_zeroes: Whether Lightning zeroes the gradients for this batch (first batch of an accumulation).
            batch_steps: Whether Lightning steps the optimizer after this batch (last batch of an accumulation, or
                last batch of the epoch).

        """
        last = index == num_segments - 1
        if step_per == "batch":
            self._accumulated = 0
            return Decision(zero_grad=index == 0 and batch_zeroes, step=last and batch_steps)
        zero_grad = self._accumulated == 0
        step = self._accumulated + 1 >= accumulate_grad_batches or (last and batch_steps)
        self._accumulated = 0 if step else self._accumulated + 1
        return Decision(zero_grad=zero_grad, step=step)
