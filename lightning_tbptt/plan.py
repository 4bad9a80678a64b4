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
from lightning_tbptt.split import _tensors, batch_dim, segment_bounds, sequence_length, slice_batch


@dataclass(frozen=True)
class PlannedSegment:
    """A segment ready to run."""

    batch: Any
    """What ``training_step`` receives."""
    info: Segment
    """What :func:`~lightning_tbptt.current_segment` returns while it runs."""


class SegmentPlan:
    """The segments of one batch, built one at a time as it is iterated; its length is known up front."""

    def __init__(self, count: int, build: Callable[[], Iterator[PlannedSegment]]) -> None:
        self._count = count
        self._build = build

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[PlannedSegment]:
        return self._build()


def _rows_of(batch: Any, time_dim: int) -> tuple[int, torch.device]:
    sequence = next(t for t in _tensors(batch) if t.dim() > time_dim)
    return sequence.shape[batch_dim(time_dim)], sequence.device


def plan_segments(
    batch: Any,
    segment_length: int,
    *,
    time_dim: int = 1,
    lengths: LengthsLocation | None = None,
    drop_finished: bool = False,
) -> SegmentPlan:
    """Plan the segments of ``batch`` (see the module documentation).

    Raises:
        BatchError: If the batch cannot be split (see :func:`~lightning_tbptt.split.sequence_length`), its lengths
            are missing or invalid (see :func:`~lightning_tbptt.lengths.check_lengths`), or every sequence is empty.

    """
    if lengths is None:
        padded = sequence_length(batch, time_dim)
        rows, device = _rows_of(batch, time_dim)
        bounds = segment_bounds(padded, segment_length)

        def build_plain() -> Iterator[PlannedSegment]:
            for index, (start, stop) in enumerate(bounds):
                info = Segment(index, len(bounds), start, stop - start, time_dim, batch_size=rows, device=device)
                yield PlannedSegment(slice_batch(batch, start, stop, time_dim), info)

        return SegmentPlan(len(bounds), build_plain)

    full = lengths.get(batch)
    stripped = lengths.replace(batch, None)
    try:
        padded = sequence_length(stripped, time_dim, hint_custom_split=False)
    except BatchError as error:
        if lengths.writable:
            raise
        raise BatchError(
            f"{error} With a callable `lengths` the lengths tensor stays in the batch; pass its key or index instead,"
            " so that it is taken out before the batch is cut."
        ) from None
    rows, device = _rows_of(stripped, time_dim)
    on_cpu = check_lengths(full, where=lengths.describe(), batch_size=rows, padded_length=padded)
    # int64 (no unsigned wrap-around in `length - start`) and on the sequences' device (where the mask is used)
    full_long = full.to(device=device, dtype=torch.long, non_blocking=True)
    on_cpu = on_cpu.long()
    longest = int(on_cpu.max())
    if longest == 0:
        raise BatchError(
            f"Expected at least one sequence of the batch to have a time step but every length at"
            f" {lengths.describe()} is 0. Remove empty sequences from your DataLoader."
        )
    bounds = segment_bounds(longest, segment_length)

    def build_with_lengths() -> Iterator[PlannedSegment]:
        for index, (start, stop) in enumerate(bounds):
            size = stop - start
            valid_cpu = segment_lengths(on_cpu, start, size)
            valid = segment_lengths(full_long, start, size)
            active = None
            if drop_finished and bool((on_cpu <= start).any()):
                active = torch.nonzero(on_cpu > start).flatten()
                valid_cpu = valid_cpu[active]
                valid = valid.index_select(0, active.to(device, non_blocking=True))
            # written back into the batch with the dtype and on the device the batch had them
            in_batch = valid.to(device=full.device, dtype=full.dtype, non_blocking=True)
            data = lengths.replace(slice_batch(stripped, start, stop, time_dim, active), in_batch)
            num_valid = int(valid_cpu.sum())  # from the CPU copy: no device synchronisation
            info = Segment(index, len(bounds), start, size, time_dim, lengths=valid, rows=active, num_valid=num_valid)
            yield PlannedSegment(data, info)

    return SegmentPlan(len(bounds), build_with_lengths)


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
