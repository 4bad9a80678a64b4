"""The segment being run, and which of its time steps count.

While ``TBPTTCallback`` runs a segment (its ``training_step``, backward, optimizer step and every hook or metric called
from them), :func:`current_segment` returns a :class:`Segment` describing it. :attr:`Segment.mask` is the single source
of truth for which time steps count: the masked loss helper, :class:`~lightning_tbptt.MaskedMetric` and the weighting
of logged values all read it.

Example:
    >>> import torch
    >>> segment = Segment(index=1, count=3, start=4, length=4, time_dim=1, lengths=torch.tensor([4, 1, 0]))
    >>> segment.mask
    tensor([[ True,  True,  True,  True],
            [ True, False, False, False],
            [False, False, False, False]])
    >>> segment.num_valid
    5
    >>> current_segment()
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.NoSegmentError: Expected `current_segment()` to be called while `TBPTTCallback` runs a segment (in `training_step` or a hook or metric it calls) but no segment is running. Outside a segment, pass the mask explicitly (`mask=...`).

"""  # noqa: E501

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from lightning_tbptt.errors import ConfigurationError, NoSegmentError


@dataclass(frozen=True)
class Segment:
    """One segment of a batch, as handed to ``training_step``."""

    index: int
    """Position of the segment among the segments run for its batch (0-based)."""
    count: int
    """Number of segments run for the batch (segments in which every sequence has ended are not run)."""
    start: int | None
    """First time step of the segment within the batch; ``None`` when a custom ``split_batch`` cut the batch."""
    length: int
    """Number of time steps of the segment."""
    time_dim: int
    """The time dimension of the segment's sequence tensors."""
    lengths: Tensor | None = None
    """Valid time steps of each row in this segment, ``clamp(length - start, 0, segment_length)``, shape ``(B,)``,
    ``int64``, on the device of the sequence tensors; ``None`` when the batch has no lengths (every step is valid)."""
    rows: Tensor | None = None
    """Indices (on the CPU) of this segment's rows within the batch, when finished rows are dropped; else ``None``."""
    batch_size: int = 0
    """Number of rows of the segment; taken from ``lengths`` when it is given."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Device of the segment's tensors (where :attr:`mask` is created)."""
    num_valid: int = -1
    """Number of valid time steps, the number of ``True`` in :attr:`mask` (derived when not given)."""
    resets: Tensor | None = None
    """The reset markers: boolean ``(B, T_seg)`` tensor on the CPU, ``True`` where a row starts a new sequence (its
    recurrent state is zeroed right before that step); ``None`` when the batch has no reset markers."""
    new_start: int = 0
    """Offset of the segment's first *new* time step: with overlapping windows (``stride`` < ``segment_length``) the
    steps before it were already trained in the previous window; for a burn-in prefix, the segment's length."""
    loss_on_overlap: bool = False
    """Whether the loss applies to the overlap too (``TBPTTCallback(loss_on="window")``): :attr:`loss_mask` is then
    :attr:`valid_mask`, else :attr:`mask`."""
    burn_in: bool = False
    """Whether the segment is a burn-in prefix: run without gradient, only to refresh the recurrent state; no time
    step of it counts (:attr:`mask` and :attr:`loss_mask` are all ``False``)."""
    recomputing: bool = False
    """With ``TBPTTCallback(exact=True)``, whether this is the segment's second run: the *first pass* runs every
    segment of the batch without gradient (``False``; its ``self.log`` values are the ones logged), the
    *recomputation* runs them again with gradient, last to first (``True``; ``self.log`` does nothing, metrics are
    restored afterwards). Always ``False`` otherwise."""
    probing: bool = False
    """Whether the truncation probe runs this segment (a *band* of the probed span, see :mod:`lightning_tbptt.probe`):
    with gradient, outside any optimizer step, ``self.log`` doing nothing and metrics restored afterwards. Skip other
    side effects (a counter, a list of outputs) while it is ``True``."""

    def __post_init__(self) -> None:
        if self.lengths is not None:
            object.__setattr__(self, "batch_size", self.lengths.shape[0])
            object.__setattr__(self, "device", self.lengths.device)
        if self.burn_in:
            object.__setattr__(self, "new_start", self.length)
        if self.num_valid < 0:
            if self.lengths is None:
                valid = self.batch_size * (self.length - self.new_start)
            else:
                valid = int((self.lengths - self.new_start).clamp(min=0).sum())
            object.__setattr__(self, "num_valid", valid)

    @property
    def starts(self) -> Tensor | None:
        """The same as :attr:`resets` (its name in release 0.1.0)."""
        return self.resets

    @property
    def stop(self) -> int | None:
        """One past the last time step of the segment within the batch (``None`` when ``start`` is)."""
        return None if self.start is None else self.start + self.length

    @cached_property
    def valid_mask(self) -> Tensor:
        """Boolean ``(B, T_seg)`` mask of the steps that are not padding (the overlap included)."""
        if self.lengths is None:
            return torch.ones(self.batch_size, self.length, dtype=torch.bool, device=self.device)
        steps = torch.arange(self.length, device=self.lengths.device)
        return steps.unsqueeze(0) < self.lengths.unsqueeze(1)

    @cached_property
    def mask(self) -> Tensor:
        """Boolean mask of shape ``(B, T_seg)``: ``True`` on the time steps that count, the valid *new* ones.

        Steps of the overlap with the previous window and burn-in steps do not count, so every time step counts
        exactly once in metrics and logging.
        """
        if self.new_start == 0:
            return self.valid_mask
        steps = torch.arange(self.length, device=self.device)
        return self.valid_mask & (steps >= self.new_start).unsqueeze(0)

    @property
    def loss_mask(self) -> Tensor:
        """The steps the loss applies to, the default of :func:`~lightning_tbptt.masked_mean`.

        That is :attr:`mask`, or with ``TBPTTCallback(loss_on="window")`` every valid step of the window
        (:attr:`valid_mask`).
        """
        if self.loss_on_overlap and not self.burn_in:
            return self.valid_mask
        return self.mask

    @property
    def sequence_mask(self) -> Tensor:
        """:attr:`mask` laid out like the segment's sequence tensors: ``(B, T)`` if ``time_dim`` is 1, ``(T, B)`` if 0.

        Raises:
            ConfigurationError: For other time dimensions, where a per-step tensor's layout cannot be guessed.

        """
        return self.laid_out(self.mask)

    def laid_out(self, mask: Tensor) -> Tensor:
        """A ``(B, T_seg)`` mask laid out like the segment's sequence tensors (see :attr:`sequence_mask`).

        Raises:
            ConfigurationError: For other time dimensions, where a per-step tensor's layout cannot be guessed.

        """
        if self.time_dim == 1:
            return mask
        if self.time_dim == 0:
            return mask.t()
        raise ConfigurationError(
            f"Expected `time_dim` to be 0 or 1 to lay the mask out like the sequence tensors but got {self.time_dim}."
            " Pass the mask explicitly (`mask=...`), arranged like your per-step tensors."
        )


# A plain module attribute rather than a ContextVar: autograd runs backward hooks on worker threads (one per
# accelerator), which would not see a context variable set by the training thread.
_current: list[Segment] = []


def current_segment() -> Segment:
    """Return the segment that ``TBPTTCallback`` is running.

    Raises:
        NoSegmentError: When no segment is running (outside ``training_step`` of a fit with ``TBPTTCallback``).

    """
    if not _current:
        raise NoSegmentError(
            "Expected `current_segment()` to be called while `TBPTTCallback` runs a segment (in `training_step` or a"
            " hook or metric it calls) but no segment is running. Outside a segment, pass the mask explicitly"
            " (`mask=...`)."
        )
    return _current[-1]


@contextmanager
def running(segment: Segment) -> Iterator[Segment]:
    """Make ``segment`` the one :func:`current_segment` returns, for the duration of the block."""
    _current.append(segment)
    try:
        yield segment
    finally:
        _current.pop()
