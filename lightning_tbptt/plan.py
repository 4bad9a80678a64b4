"""Planning the segments of one batch: where each starts, which rows and time steps count, what is skipped.

With per-sequence lengths, time steps at or after a sequence's length are padding:

* the segments cover only ``[0, max(lengths))``: a segment in which every sequence has ended is not run, and the last
  segment ends at the longest sequence's end;
* each segment carries its own lengths, ``clamp(length - start, 0, segment_length)``, at the place the batch had them;
* with ``drop_finished``, a segment keeps only the rows whose sequence has not ended before it starts, so no row of a
  segment has length 0.

Segments are built one at a time as the plan is iterated, so only the running segment's data (views, or copies of
its rows when rows are dropped) exists at once.

Example:
    >>> import torch
    >>> from lightning_tbptt.lengths import LengthsLocation
    >>> batch = (torch.zeros(3, 10, 2), torch.tensor([10, 3, 6]))
    >>> plan = plan_segments(batch, 4, lengths=LengthsLocation(1), drop_finished=True)
    >>> [(s.info.start, s.info.length, s.info.lengths.tolist(), s.info.rows) for s in plan]
    [(0, 4, [4, 3, 4], None), (4, 4, [4, 2], tensor([0, 2])), (8, 2, [2], tensor([0]))]

"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_tbptt.errors import BatchError
from lightning_tbptt.lengths import LengthsLocation, check_lengths, segment_lengths
from lightning_tbptt.segment import Segment
from lightning_tbptt.split import _tensors, batch_dim, sequence_length, slice_batch


@dataclass(frozen=True)
class PlannedSegment:
    """A segment ready to run."""

    batch: Any
    """What ``training_step`` receives."""
    info: Segment
    """What :func:`~lightning_tbptt.current_segment` returns while it runs."""
    carry_at: int | None = None
    """The offset after which the state carried into the next segment is taken (the next window's first step), or
    ``None``: the segment's end."""


@dataclass(frozen=True)
class Window:
    """Where one segment lies in its batch."""

    start: int
    stop: int
    new_start: int = 0
    """Offset of the first step not trained by an earlier window (the segment's length for a burn-in prefix)."""
    carry_at: int | None = None
    burn_in: bool = False


def windows(length: int, segment_length: int, stride: int | None = None, burn_in: int = 0) -> list[Window]:
    """Return the segments covering ``length`` steps.

    A burn-in prefix of ``burn_in`` steps, then windows of ``segment_length`` steps starting every ``stride`` steps
    until one reaches the end.

    Each window after the first overlaps the previous one by ``segment_length - stride`` steps, its new steps are its
    last ``stride``, and the state carried into it is the previous window's state after ``stride`` steps. Without a
    stride (or with ``stride == segment_length``) these are consecutive segments.

    Example:
        >>> [(w.start, w.stop, w.new_start, w.carry_at) for w in windows(10, 4, stride=2)]
        [(0, 4, 0, 2), (2, 6, 2, 2), (4, 8, 2, 2), (6, 10, 2, None)]
        >>> [(w.start, w.stop, w.burn_in) for w in windows(10, 4, burn_in=3)]
        [(0, 3, True), (3, 7, False), (7, 10, False)]

    """
    stride = segment_length if stride is None else stride
    found = [Window(0, burn_in, burn_in, None, True)] if burn_in else []
    start, covered = burn_in, burn_in
    while covered < length:
        stop = min(start + segment_length, length)
        # the next window starts inside this one: carry the state from there
        carry_at = stride if stop < length and stride < stop - start else None
        found.append(Window(start, stop, covered - start, carry_at))
        covered, start = stop, start + stride
    return found


class SegmentPlan:
    """The segments of one batch, built one at a time as it is iterated; its length is known up front."""

    def __init__(
        self,
        count: int,
        build: Callable[[], Iterator[PlannedSegment]],
        *,
        batch_size: int = 0,
        time_length: int = 0,
        lengths: torch.Tensor | None = None,
        first_starts: torch.Tensor | None = None,
        burn_in_segments: int = 0,
    ) -> None:
        self._count = count
        self.burn_in_segments = burn_in_segments
        self._build = build
        self.batch_size = batch_size
        """Number of rows of the batch (0 when a custom split cut it)."""
        self.time_length = time_length
        """Padded number of time steps of the batch (0 when a custom split cut it)."""
        self.lengths = lengths
        """The batch's lengths on the CPU, or ``None``."""
        self.first_starts = first_starts
        """``(B,)`` boolean, on the CPU: the rows that start a new sequence at the batch's first step; ``None`` when the
        batch has no reset markers."""

    def __len__(self) -> int:
        return self._count

    @property
    def steps(self) -> int:
        """Number of segments that train (burn-in prefixes excluded)."""
        return self._count - self.burn_in_segments

    def __iter__(self) -> Iterator[PlannedSegment]:
        return self._build()


def _rows_of(batch: Any, time_dim: int) -> tuple[int, torch.device]:
    sequence = next(t for t in _tensors(batch) if t.dim() > time_dim)
    return sequence.shape[batch_dim(time_dim)], sequence.device


def _strip(batch: Any, location: LengthsLocation) -> Any:
    return location.replace(batch, None)


def _check_starts(starts: torch.Tensor, where: str, batch_size: int, padded: int, time_dim: int) -> torch.Tensor:
    """Validate reset markers and return them as a ``(B, T)`` boolean tensor on the CPU."""
    layout = (batch_size, padded) if time_dim != 0 else (padded, batch_size)
    if starts.dtype != torch.bool or tuple(starts.shape) not in ((batch_size,), layout):
        raise BatchError(
            f"Expected the reset markers at {where} to be a boolean tensor of shape ({batch_size},) (a new sequence"
            f" starts at the batch's first step) or {layout} (laid out like the sequences: True where a new sequence"
            f" starts) but got a {starts.dtype} tensor of shape {tuple(starts.shape)}. Build them with e.g."
            " `torch.zeros(B, T, dtype=torch.bool)` and set True at each sequence's first step."
        )
    on_cpu = starts.detach().cpu()
    if on_cpu.dim() == 1:
        full = torch.zeros(batch_size, padded, dtype=torch.bool)
        full[:, 0] = on_cpu
        return full
    return on_cpu.t() if time_dim == 0 else on_cpu


def plan_segments(
    batch: Any,
    segment_length: int,
    *,
    time_dim: int = 1,
    lengths: LengthsLocation | None = None,
    drop_finished: bool = False,
    resets: LengthsLocation | None = None,
    stride: int | None = None,
    burn_in: int = 0,
    loss_on_overlap: bool = False,
    whole_burn_in: bool = False,
) -> SegmentPlan:
    """Plan the segments of ``batch`` (see the module documentation).

    Args:
        batch: The batch to cut.
        segment_length: Time steps per segment.
        time_dim: The time dimension of sequence tensors.
        lengths: Where the batch holds its sequences' lengths, or ``None`` (every step is valid).
        drop_finished: With ``lengths``, keep in each segment only the rows whose sequence has not ended.
        resets: Where the batch holds its reset markers (a boolean ``(B,)`` flag per row, or ``(B, T)`` /
            ``(T, B)`` markers laid out like the sequences), or ``None``. Each segment gets its own slice of the
            markers in their place, and :attr:`Segment.starts`.
        stride: Steps between the starts of overlapping windows of ``segment_length`` steps (see :func:`windows`);
            ``None``: consecutive segments.
        burn_in: Steps of a prefix run without gradient before the first window, 0 for none.
        loss_on_overlap: Whether the segments' :attr:`~Segment.loss_mask` includes the overlap.
        whole_burn_in: Accept a batch that ``burn_in`` covers whole (it is then one burn-in segment); else raise.

    Raises:
        BatchError: If the batch cannot be split (see :func:`~lightning_tbptt.split.sequence_length`), its lengths
            are missing or invalid (see :func:`~lightning_tbptt.lengths.check_lengths`), its reset markers have the
            wrong shape or dtype, or every sequence is empty.

    """
    stripped = batch
    for location in (lengths, resets):
        if location is not None:
            stripped = _strip(stripped, location)
    try:
        padded = sequence_length(stripped, time_dim, hint_custom_split=lengths is None and resets is None)
    except BatchError as error:
        read_only = [f"`{loc.argument}`" for loc in (lengths, resets) if loc is not None and not loc.writable]
        if not read_only:
            raise
        raise BatchError(
            f"{error} With a callable {' and '.join(read_only)} the tensor stays in the batch; pass its key or index"
            " instead, so that it is taken out before the batch is cut."
        ) from None
    rows, device = _rows_of(stripped, time_dim)
    full = on_cpu = None
    longest = padded
    if lengths is not None:
        full = lengths.get(batch)
        on_cpu = check_lengths(full, where=lengths.describe(), batch_size=rows, padded_length=padded).long()
        longest = int(on_cpu.max())
        if longest == 0:
            raise BatchError(
                f"Expected at least one sequence of the batch to have a time step but every length at"
                f" {lengths.describe()} is 0. Remove empty sequences from your DataLoader."
            )
    starts = given_starts = None
    if resets is not None:
        given_starts = resets.get(batch)
        starts = _check_starts(given_starts, resets.describe(), rows, padded, time_dim)
    if burn_in >= longest and whole_burn_in:
        burn_in = longest
    elif burn_in >= longest:
        raise BatchError(
            f"Expected `burn_in` to be shorter than the batch's {'longest sequence' if lengths else 'sequences'}"
            f" ({longest} steps) but got {burn_in}, so no step would be trained. Lower `burn_in` or use longer"
            " sequences."
        )
    bounds = windows(longest, segment_length, stride, burn_in)
    # int64 (no unsigned wrap-around in `length - start`) and on the sequences' device (where the mask is used)
    full_long = None if full is None else full.to(device=device, dtype=torch.long, non_blocking=True)

    def build() -> Iterator[PlannedSegment]:
        for index, window in enumerate(bounds):
            start, stop = window.start, window.stop
            size = stop - start
            active = None
            if on_cpu is not None and drop_finished and bool((on_cpu <= start).any()):
                active = torch.nonzero(on_cpu > start).flatten()
            data = slice_batch(stripped, start, stop, time_dim, active)
            valid = num_valid = None
            if full is not None and on_cpu is not None and full_long is not None and lengths is not None:
                valid_cpu = segment_lengths(on_cpu, start, size)
                valid = segment_lengths(full_long, start, size)
                if active is not None:
                    valid_cpu = valid_cpu[active]
                    valid = valid.index_select(0, active.to(device, non_blocking=True))
                # written back into the batch with the dtype and on the device the batch had them
                data = lengths.replace(data, valid.to(device=full.device, dtype=full.dtype, non_blocking=True))
                # from the CPU copy: no device synchronisation
                num_valid = int((valid_cpu - window.new_start).clamp(min=0).sum())
            segment_starts = None
            if starts is not None and given_starts is not None and resets is not None:
                segment_starts = starts[:, start:stop] if active is None else starts[active, start:stop]
                data = resets.replace(data, _starts_in_batch(given_starts, segment_starts, index, active, time_dim))
            info = Segment(
                index,
                len(bounds),
                start,
                size,
                time_dim,
                lengths=valid,
                rows=active,
                batch_size=rows if active is None else active.numel(),
                device=device,
                num_valid=-1 if num_valid is None else num_valid,
                starts=segment_starts,
                new_start=window.new_start,
                loss_on_overlap=loss_on_overlap,
                burn_in=window.burn_in,
            )
            yield PlannedSegment(data, info, window.carry_at)

    first = None if starts is None else starts[:, 0].clone()
    return SegmentPlan(
        len(bounds),
        build,
        batch_size=rows,
        time_length=padded,
        lengths=on_cpu,
        first_starts=first,
        burn_in_segments=sum(window.burn_in for window in bounds),
    )


def _starts_in_batch(
    given: torch.Tensor, segment_starts: torch.Tensor, index: int, rows: torch.Tensor | None, time_dim: int
) -> torch.Tensor:
    """The markers a segment's batch holds: in the form, dtype and device the batch had them."""
    if given.dim() == 1:
        flags = segment_starts[:, 0] if index == 0 else torch.zeros(segment_starts.shape[0], dtype=torch.bool)
        return flags.to(given.device, non_blocking=True)
    laid_out = segment_starts.t() if time_dim == 0 else segment_starts
    return laid_out.to(given.device, non_blocking=True)


def plan_custom_segments(segments: Sequence[Any], time_dim: int, source: str) -> SegmentPlan:
    """Wrap segments cut by a custom ``split_batch``: their start in the batch is unknown and every step counts.

    Raises:
        BatchError: If a segment does not follow the sequence rule of :mod:`lightning_tbptt.split` (its mask would be
            unknown).

    """

    def build() -> Iterator[PlannedSegment]:
        for index, segment in enumerate(segments):
            try:
                length = sequence_length(segment, time_dim)
            except BatchError as error:
                raise BatchError(f"In segment {index} returned by `{source}`: {error}") from None
            rows, device = _rows_of(segment, time_dim)
            info = Segment(index, len(segments), None, length, time_dim, batch_size=rows, device=device)
            yield PlannedSegment(segment, info)

    return SegmentPlan(len(segments), build)
