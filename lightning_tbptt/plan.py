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
    >>> from lightning_tbptt.fields import FieldLocation
    >>> batch = (torch.zeros(3, 10, 2), torch.tensor([10, 3, 6]))
    >>> plan = plan_segments(batch, 4, lengths=FieldLocation(1), drop_finished=True)
    >>> [(s.info.start, s.info.length, s.info.lengths.tolist(), s.info.rows) for s in plan]
    [(0, 4, [4, 3, 4], None), (4, 4, [4, 2], tensor([0, 2])), (8, 2, [2], tensor([0]))]

"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_tbptt.errors import BatchError
from lightning_tbptt.fields import FieldLocation, check_lengths, segment_lengths
from lightning_tbptt.segment import Segment
from lightning_tbptt.split import _tensors, batch_dim, sequence_length, slice_batch
from lightning_tbptt.windows import windows


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


class SegmentPlan:
    """The segments of one batch, built one at a time as it is iterated; its length is known up front."""

    def __init__(
        self,
        count: int,
        build: Callable[[int], Iterator[PlannedSegment]],
        *,
        batch_size: int = 0,
        time_length: int = 0,
        lengths: torch.Tensor | None = None,
        first_resets: torch.Tensor | None = None,
        burn_in_segments: int = 0,
    ) -> None:
        self._count = count
        self.burn_in_segments = burn_in_segments
        self._build = build
        self._reported = count
        self.batch_size = batch_size
        """Number of rows of the batch (0 when a custom split cut it)."""
        self.time_length = time_length
        """Padded number of time steps of the batch (0 when a custom split cut it)."""
        self.lengths = lengths
        """The batch's lengths on the CPU, or ``None``."""
        self.first_resets = first_resets
        """``(B,)`` boolean, on the CPU: the rows that start a new sequence at the batch's first step; ``None`` when the
        batch has no reset markers."""

    def __len__(self) -> int:
        return self._count

    @property
    def steps(self) -> int:
        """Number of segments that train (burn-in prefixes excluded)."""
        return self._count - self.burn_in_segments

    def agree(self, steps: int) -> None:
        """Make every segment report ``steps`` training steps (plus the burn-in) as its :attr:`Segment.count`.

        With several processes, a process with fewer segments than another takes part in the other's steps too, so
        its hooks see the count the processes agreed on.
        """
        self._reported = steps + self.burn_in_segments

    def __iter__(self) -> Iterator[PlannedSegment]:
        return self._build(self._reported)


def _rows_of(batch: Any, time_dim: int) -> tuple[int, torch.device]:
    sequence = next(t for t in _tensors(batch) if t.dim() > time_dim)
    return sequence.shape[batch_dim(time_dim)], sequence.device


def _strip(batch: Any, location: FieldLocation) -> Any:
    return location.replace(batch, None)


def _check_resets(resets: torch.Tensor, where: str, batch_size: int, padded: int, time_dim: int) -> torch.Tensor:
    """Validate reset markers and return them as a ``(B, T)`` boolean tensor on the CPU."""
    layout = (batch_size, padded) if time_dim != 0 else (padded, batch_size)
    if resets.dtype != torch.bool or tuple(resets.shape) not in ((batch_size,), layout):
        raise BatchError(
            f"Expected the reset markers at {where} to be a boolean tensor of shape ({batch_size},) (a new sequence"
            f" starts at the batch's first step) or {layout} (laid out like the sequences: True where a new sequence"
            f" starts) but got a {resets.dtype} tensor of shape {tuple(resets.shape)}. Build them with e.g."
            " `torch.zeros(B, T, dtype=torch.bool)` and set True at each sequence's first step."
        )
    on_cpu = resets.detach().cpu()
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
    lengths: FieldLocation | None = None,
    drop_finished: bool = False,
    resets: FieldLocation | None = None,
    stride: int | None = None,
    burn_in: int = 0,
    loss_on_overlap: bool = False,
    whole_burn_in: bool = False,
    new_steps: Iterator[int] | None = None,
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
            markers in their place, and :attr:`Segment.resets`.
        stride: Steps between the starts of overlapping windows of ``segment_length`` steps (see :func:`windows`);
            ``None``: consecutive segments.
        burn_in: Steps of a prefix run without gradient before the first window, 0 for none.
        loss_on_overlap: Whether the segments' :attr:`~Segment.loss_mask` includes the overlap.
        whole_burn_in: Accept a batch that ``burn_in`` covers whole (it is then one burn-in segment); else raise.
        new_steps: The new steps of each window in turn (drawn lengths, see :func:`~lightning_tbptt.windows.windows`);
            ``None``: ``stride`` (or ``segment_length``).

    Raises:
        BatchError: If the batch cannot be split (see :func:`~lightning_tbptt.split.sequence_length`), its lengths
            are missing or invalid (see :func:`~lightning_tbptt.fields.check_lengths`), its reset markers have the
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
    marks = given_resets = None
    if resets is not None:
        given_resets = resets.get(batch)
        marks = _check_resets(given_resets, resets.describe(), rows, padded, time_dim)
    if burn_in >= longest and whole_burn_in:
        burn_in = longest
    elif burn_in >= longest:
        raise BatchError(
            f"Expected `burn_in` to be shorter than the batch's {'longest sequence' if lengths else 'sequences'}"
            f" ({longest} steps) but got {burn_in}, so no step would be trained. Lower `burn_in` or use longer"
            " sequences."
        )
    bounds = windows(longest, segment_length, stride, burn_in, new_steps)
    # int64 (no unsigned wrap-around in `length - start`) and on the sequences' device (where the mask is used)
    full_long = None if full is None else full.to(device=device, dtype=torch.long, non_blocking=True)

    def build(count: int) -> Iterator[PlannedSegment]:
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
            segment_resets = None
            if marks is not None and given_resets is not None and resets is not None:
                segment_resets = marks[:, start:stop] if active is None else marks[active, start:stop]
                data = resets.replace(data, _resets_in_batch(given_resets, segment_resets, index, active, time_dim))
            info = Segment(
                index,
                count,
                start,
                size,
                time_dim,
                lengths=valid,
                rows=active,
                batch_size=rows if active is None else active.numel(),
                device=device,
                num_valid=-1 if num_valid is None else num_valid,
                resets=segment_resets,
                new_start=window.new_start,
                loss_on_overlap=loss_on_overlap,
                burn_in=window.burn_in,
            )
            yield PlannedSegment(data, info, window.carry_at)

    first = None if marks is None else marks[:, 0].clone()
    return SegmentPlan(
        len(bounds),
        build,
        batch_size=rows,
        time_length=padded,
        lengths=on_cpu,
        first_resets=first,
        burn_in_segments=sum(window.burn_in for window in bounds),
    )


def _resets_in_batch(
    given: torch.Tensor, segment_resets: torch.Tensor, index: int, rows: torch.Tensor | None, time_dim: int
) -> torch.Tensor:
    """The markers a segment's batch holds: in the form, dtype and device the batch had them."""
    if given.dim() == 1:
        flags = segment_resets[:, 0] if index == 0 else torch.zeros(segment_resets.shape[0], dtype=torch.bool)
        return flags.to(given.device, non_blocking=True)
    laid_out = segment_resets.t() if time_dim == 0 else segment_resets
    return laid_out.to(given.device, non_blocking=True)


def plan_custom_segments(segments: Sequence[Any], time_dim: int, source: str) -> SegmentPlan:
    """Wrap segments cut by a custom ``split_batch``: their start in the batch is unknown and every step counts.

    Raises:
        BatchError: If a segment does not follow the sequence rule of :mod:`lightning_tbptt.split` (its mask would be
            unknown).

    """

    def build(count: int) -> Iterator[PlannedSegment]:
        for index, segment in enumerate(segments):
            try:
                length = sequence_length(segment, time_dim)
            except BatchError as error:
                raise BatchError(f"In segment {index} returned by `{source}`: {error}") from None
            rows, device = _rows_of(segment, time_dim)
            info = Segment(index, count, None, length, time_dim, batch_size=rows, device=device)
            yield PlannedSegment(segment, info)

    return SegmentPlan(len(segments), build)
