"""Where the segments of a batch lie in time: the one implementation of the window geometry.

A batch of ``length`` steps is covered by an optional burn-in prefix of ``burn_in`` steps, then by windows of
``segment_length`` steps that start every ``stride`` steps until one reaches the end. Without a stride (or with
``stride == segment_length``) these are the consecutive segments of plain TBPTT. :class:`Geometry` holds the four
settings as one frozen value; :func:`windows` lists a batch's segments; :func:`training_windows` counts the ones that
train (the optimizer steps of a batch with ``step_per="segment"``).

Example:
    >>> [(w.start, w.stop) for w in windows(10, 4)]
    [(0, 4), (4, 8), (8, 10)]
    >>> training_windows(10, 4, stride=2)
    4

"""

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Literal

LossOn = Literal["new", "window"]
LOSS_ON_CHOICES: tuple[LossOn, ...] = ("new", "window")


@dataclass(frozen=True)
class Window:
    """Where one segment lies in its batch."""

    start: int
    stop: int
    new_start: int = 0
    """Offset of the first step not trained by an earlier window (the segment's length for a burn-in prefix)."""
    carry_at: int | None = None
    """The offset after which the state carried into the next segment is taken (the next window's first step), or
    ``None``: the segment's end."""
    burn_in: bool = False


def windows(
    length: int,
    segment_length: int,
    stride: int | None = None,
    burn_in: int = 0,
    new_steps: Iterator[int] | None = None,
) -> list[Window]:
    """Return the segments covering ``length`` steps.

    A burn-in prefix of ``burn_in`` steps, then windows of ``segment_length`` steps starting every ``stride`` steps
    until one reaches the end.

    Each window after the first overlaps the previous one by ``segment_length - stride`` steps, its new steps are its
    last ``stride``, and the state carried into it is the previous window's state after ``stride`` steps. Without a
    stride (or with ``stride == segment_length``) these are consecutive segments.

    ``new_steps``: the number of new steps of each window in turn, in place of ``stride`` (randomised segment lengths,
    see :mod:`lightning_tbptt.random_lengths`); each window is then its new steps plus the overlap,
    ``segment_length - stride``, before them (the first window, which has nothing before it, is as long). A constant
    ``stride`` gives the windows above.

    Example:
        >>> [(w.start, w.stop, w.new_start, w.carry_at) for w in windows(10, 4, stride=2)]
        [(0, 4, 0, 2), (2, 6, 2, 2), (4, 8, 2, 2), (6, 10, 2, None)]
        >>> [(w.start, w.stop, w.burn_in) for w in windows(10, 4, burn_in=3)]
        [(0, 3, True), (3, 7, False), (7, 10, False)]
        >>> [(w.start, w.stop) for w in windows(10, 4, new_steps=iter([3, 5, 4]))]
        [(0, 3), (3, 8), (8, 10)]

    """
    stride = segment_length if stride is None else stride
    overlap = segment_length - stride
    steps = repeat(stride) if new_steps is None else new_steps
    found = [Window(0, burn_in, burn_in, None, True)] if burn_in else []
    covered = burn_in
    while covered < length:
        start = max(burn_in, covered - overlap)
        stop = min(start + overlap + next(steps), length)
        # the next window starts inside this one: carry the state from there
        carry_at = stop - overlap - start if stop < length and overlap > 0 else None
        found.append(Window(start, stop, covered - start, carry_at))
        covered = stop
    return found


def training_windows(
    length: int,
    segment_length: int,
    stride: int | None = None,
    burn_in: int = 0,
    new_steps: Iterator[int] | None = None,
) -> int:
    """The number of segments of :func:`windows` that train: all but the burn-in prefix."""
    return sum(not window.burn_in for window in windows(length, segment_length, stride, burn_in, new_steps))


@dataclass(frozen=True)
class Geometry:
    """The window settings of a ``TBPTTCallback``: segment length, stride, burn-in and which steps the loss covers.

    ``segment_length`` is ``None`` until a fit resolves it (from the module's ``truncated_bptt_steps``); see
    :meth:`resolved`.
    """

    segment_length: int | None
    stride: int | None = None
    burn_in: int = 0
    loss_on: LossOn = "new"

    def resolved(self, segment_length: int) -> "Geometry":
        """This geometry with its segment length set (for a fit that takes it from the module)."""
        return Geometry(segment_length, self.stride, self.burn_in, self.loss_on)

    @property
    def length(self) -> int:
        """The resolved segment length (0 before it is known)."""
        return self.segment_length or 0

    @property
    def overlaps(self) -> bool:
        """Whether windows overlap (a stride shorter than the segment length)."""
        return self.stride is not None and self.stride != self.length

    @property
    def effective_stride(self) -> int:
        """Steps between window starts: the stride, or the segment length."""
        return self.stride or self.length
