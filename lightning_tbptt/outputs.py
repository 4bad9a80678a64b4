"""Joining the outputs of a batch's segments back into one output for the batch.

An evaluation or prediction step runs once per segment; what the loop (``on_*_batch_end`` hooks, the predictions that
``Trainer.predict`` returns) receives for the batch is the segments' outputs joined by one rule, leaf by leaf of the
output's structure (dicts, lists, tuples):

* a tensor laid out like the segment's sequences in every segment (the segment's rows along the batch dimension and its
  time steps along ``time_dim``) is a per-step output: the pieces are put back in their place along time, so the result is laid out like the batch's sequences (``(B, T,
  ...)``). Places the callback did not run (rows of finished sequences that were dropped, an all-padding tail) are
  zeros;
* anything else (a loss, a per-sequence summary, a non-tensor value) is taken from the last segment, as a training
  batch's output is.

Example:
    >>> import torch
    >>> from lightning_tbptt.segment import Segment
    >>> segments = [Segment(0, 2, 0, 3, time_dim=1, batch_size=2), Segment(1, 2, 3, 2, time_dim=1, batch_size=2)]
    >>> outputs = [{"y": torch.zeros(2, 3), "loss": torch.tensor(1.0)}, {"y": torch.ones(2, 2), "loss": torch.tensor(2.0)}]
    >>> joined = join_outputs(outputs, segments, batch_size=2, time_length=5)
    >>> joined["y"]
    tensor([[0., 0., 0., 1., 1.],
            [0., 0., 0., 1., 1.]])
    >>> joined["loss"]
    tensor(2.)

"""  # noqa: E501

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import is_namedtuple
from torch import Tensor

from lightning_tbptt.segment import Segment
from lightning_tbptt.split import batch_dim


def _per_step(values: Sequence[Any], segments: Sequence[Segment]) -> bool:
    """Whether every value is laid out like its segment's sequences: its rows, then (or before) its time steps."""
    return all(
        isinstance(value, Tensor)
        and value.dim() > max(segment.time_dim, batch_dim(segment.time_dim))
        and value.shape[segment.time_dim] == segment.length
        and value.shape[batch_dim(segment.time_dim)] == segment.batch_size
        for value, segment in zip(values, segments, strict=True)
    )


def _join_tensors(pieces: Sequence[Tensor], segments: Sequence[Segment], batch_size: int, time_length: int) -> Tensor:
    time_dim = segments[0].time_dim
    in_place = all(segment.start is not None for segment in segments)
    covered = sum(segment.length for segment in segments)
    if not in_place or (covered == time_length and all(segment.rows is None for segment in segments)):
        return torch.cat(list(pieces), dim=time_dim)
    rows_dim = batch_dim(time_dim)
    shape = list(pieces[-1].shape)
    shape[time_dim] = time_length
    shape[rows_dim] = batch_size
    joined = pieces[-1].new_zeros(shape)
    for piece, segment in zip(pieces, segments, strict=True):
        assert segment.start is not None
        target = joined.narrow(time_dim, segment.start, segment.length)
        if segment.rows is None:
            target.copy_(piece)
        else:
            target.index_copy_(rows_dim, segment.rows.to(piece.device), piece)
    return joined


def join_outputs(outputs: Sequence[Any], segments: Sequence[Segment], *, batch_size: int, time_length: int) -> Any:
    """Join the ``outputs`` of a batch's ``segments`` (see the module documentation).

    Args:
        outputs: One output per segment, in order.
        segments: The segments that produced them.
        batch_size: Rows of the batch (segments may hold fewer when finished rows are dropped).
        time_length: Padded time steps of the batch (0 when a custom split cut it: pieces are then concatenated).

    """
    last = outputs[-1]
    if isinstance(last, Tensor):
        if _per_step(outputs, segments):
            return _join_tensors(outputs, segments, batch_size, time_length)
        return last
    if isinstance(last, Mapping):
        if not all(isinstance(out, Mapping) and out.keys() == last.keys() for out in outputs):
            return last
        joined = {
            key: join_outputs([out[key] for out in outputs], segments, batch_size=batch_size, time_length=time_length)
            for key in last
        }
        return type(last)(joined) if type(last) is not dict else joined  # type: ignore[call-arg]
    if isinstance(last, (list, tuple)):
        if not all(type(out) is type(last) and len(out) == len(last) for out in outputs):
            return last
        items = [
            join_outputs([out[i] for out in outputs], segments, batch_size=batch_size, time_length=time_length)
            for i in range(len(last))
        ]
        return type(last)(*items) if is_namedtuple(last) else type(last)(items)
    return last
