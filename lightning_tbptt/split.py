"""Cutting a batch into consecutive segments along its time dimension.

The rule that decides what is a sequence:

* a tensor with more than ``time_dim`` dimensions is a *sequence tensor*;
* every sequence tensor of a batch must have the same size along ``time_dim``; that size is the batch's sequence
  length ``T`` (tensors that disagree are an error, never a guess);
* each sequence tensor is cut into views ``tensor.narrow(time_dim, start, length)`` (no copies; sparse COO and 2-D
  CSR/CSC tensors are cut into copies of the same layout, see :func:`narrow`); every other value
  (tensors with ``time_dim`` or fewer dimensions such as per-sequence labels of shape ``(B,)``, scalars, strings,
  ``None``) is passed unchanged into every segment.

Batches may be any collection that Lightning itself moves between devices: tuples, lists, dicts, namedtuples,
dataclasses, nested in any way.

Example:
    >>> import torch
    >>> batch = {"x": torch.zeros(2, 5, 3), "y": torch.zeros(2, 5), "label": torch.tensor([0, 1])}
    >>> [tuple(s["x"].shape) for s in split_batch(batch, segment_length=2)]
    [(2, 2, 3), (2, 2, 3), (2, 1, 3)]
    >>> split_batch(batch, segment_length=2)[2]["label"]
    tensor([0, 1])
    >>> sequence_length((torch.zeros(2, 5, 3), torch.zeros(2, 4)))
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.BatchError: Expected every sequence tensor of the batch (a tensor with more than `time_dim=1` dimensions) to have the same size along dimension 1 but got sizes [5, 4] for tensors of shapes [(2, 5, 3), (2, 4)]. Pad them to one length, give per-sequence tensors (labels, lengths) at most 1 dimension, or override `TBPTTCallback.split_batch`.

"""  # noqa: E501

from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_tbptt.errors import BatchError
from lightning_tbptt.windows import windows

_MAX_SHAPES_SHOWN = 8


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def _shapes(tensors: list[Tensor]) -> str:
    shapes = [tuple(t.shape) for t in tensors[:_MAX_SHAPES_SHOWN]]
    more = ", ..." if len(tensors) > _MAX_SHAPES_SHOWN else ""
    return ", ".join(str(s) for s in shapes) + more


def sequence_length(batch: Any, time_dim: int = 1, hint_custom_split: bool = True) -> int:
    """Return the length ``T`` along ``time_dim`` that every sequence tensor of ``batch`` shares.

    Args:
        batch: Any collection of tensors (see the module documentation for the rule).
        time_dim: The dimension that indexes time in sequence tensors.
        hint_custom_split: Whether error messages may suggest overriding ``TBPTTCallback.split_batch``.

    Returns:
        The sequence length of the batch.

    Raises:
        BatchError: If the batch has no tensor, no tensor with a ``time_dim`` dimension, sequence tensors that
            disagree on their length, or a length of 0.

    """
    override = " or override `TBPTTCallback.split_batch`" if hint_custom_split else ""
    tensors = _tensors(batch)
    if not tensors:
        raise BatchError(
            f"Expected the batch to contain at least one tensor to cut along `time_dim={time_dim}` but got"
            f" a batch of type {type(batch).__name__} without tensors. Return tensors from your DataLoader{override}."
        )
    sequences = [t for t in tensors if t.dim() > time_dim]
    if not sequences:
        raise BatchError(
            f"Expected at least one tensor of the batch to have dimension `time_dim={time_dim}` but got tensors of"
            f" shapes [{_shapes(tensors)}]. Set `time_dim` to the time dimension of your sequence tensors (1 for"
            " batch-first `(B, T, ...)`, 0 for time-first `(T, B, ...)`)."
        )
    lengths = sorted({t.shape[time_dim] for t in sequences}, reverse=True)
    if len(lengths) > 1:
        if time_dim == 0:
            per_sequence = "keep per-sequence tensors out of time-first batches (give lengths as `lengths=`)"
        else:
            per_sequence = f"give per-sequence tensors (labels, lengths) at most {time_dim} dimension" + "s" * (
                time_dim > 1
            )
        raise BatchError(
            "Expected every sequence tensor of the batch (a tensor with more than"
            f" `time_dim={time_dim}` dimensions) to have the same size along dimension {time_dim} but got sizes"
            f" {lengths} for tensors of shapes [{_shapes(sequences)}]. Pad them to one length,"
            f" {per_sequence}{',' if override else ''}{override}."
        )
    if lengths[0] == 0:
        raise BatchError(
            f"Expected the batch's sequences to have at least one time step along `time_dim={time_dim}` but got"
            f" length 0 for tensors of shapes [{_shapes(sequences)}]. Remove empty sequences from your DataLoader."
        )
    return lengths[0]


_COMPRESSED = (torch.sparse_csr, torch.sparse_csc)


def narrow(tensor: Tensor, dim: int, start: int, size: int) -> Tensor:
    """Return steps ``start:start + size`` of ``tensor`` along ``dim``: a view, or a copy of a sparse tensor.

    Sparse COO tensors are sliced with ``narrow_copy``; 2-D CSR and CSC tensors through COO and back to their layout.

    Raises:
        BatchError: For a sparse layout that cannot be sliced along time (BSR, BSC, or CSR/CSC with batch dimensions).

    """
    if tensor.layout == torch.strided:
        return tensor.narrow(dim, start, size)
    if tensor.layout == torch.sparse_coo:
        return tensor.narrow_copy(dim, start, size)
    if tensor.layout in _COMPRESSED and tensor.dim() == 2:
        return tensor.to_sparse_coo().narrow_copy(dim, start, size).to_sparse(layout=tensor.layout)
    raise BatchError(
        f"Expected the sequence tensors of the batch to be dense, sparse COO, or 2-D sparse CSR/CSC tensors but got a"
        f" {tensor.layout} tensor of shape {tuple(tensor.shape)}, which cannot be cut along `time_dim={dim}`. Convert"
        " it in your collate function (e.g. `tensor.to_sparse_coo()`), or override `TBPTTCallback.split_batch`."
    )


def select_rows(tensor: Tensor, dim: int, rows: Tensor) -> Tensor:
    """Return the ``rows`` (indices) of ``tensor`` along ``dim``, for any layout :func:`narrow` accepts (a copy)."""
    if tensor.layout in _COMPRESSED:
        return tensor.to_sparse_coo().index_select(dim, rows).to_sparse(layout=tensor.layout)
    return tensor.index_select(dim, rows)


def segment_bounds(length: int, segment_length: int) -> list[tuple[int, int]]:
    """Return the ``(start, stop)`` time indices of consecutive segments covering ``length`` steps.

    The last segment is shorter when ``segment_length`` does not divide ``length``.

    Example:
        >>> segment_bounds(10, 4)
        [(0, 4), (4, 8), (8, 10)]

    """
    return [(window.start, window.stop) for window in windows(length, segment_length)]


def batch_dim(time_dim: int) -> int:
    """The dimension of sequence tensors that indexes the sequences: 0, or 1 when time comes first."""
    return 1 if time_dim == 0 else 0


def slice_batch(batch: Any, start: int, stop: int, time_dim: int = 1, rows: Tensor | None = None) -> Any:
    """Return ``batch`` restricted to time steps ``start:stop`` of every sequence tensor (views, no copies).

    Tensors with ``time_dim`` or fewer dimensions and non-tensor values are returned unchanged, except with ``rows``:
    then only those rows (indices of sequences) are kept, from every sequence tensor (along :func:`batch_dim`) and from
    every other tensor whose first dimension has the batch's size (a per-sequence tensor such as labels). Selecting
    rows copies.

    """
    size = stop - start
    if rows is None:

        def cut(tensor: Tensor) -> Tensor:
            return narrow(tensor, time_dim, start, size) if tensor.dim() > time_dim else tensor

        return apply_to_collection(batch, Tensor, cut)

    sequences = [t for t in _tensors(batch) if t.dim() > time_dim]
    num_rows = sequences[0].shape[batch_dim(time_dim)]
    on_device: dict[Any, Tensor] = {}

    def select(tensor: Tensor) -> Tensor:
        if tensor.device not in on_device:
            on_device[tensor.device] = rows.to(tensor.device, non_blocking=True)
        if tensor.dim() > time_dim:
            return select_rows(narrow(tensor, time_dim, start, size), batch_dim(time_dim), on_device[tensor.device])
        if tensor.dim() >= 1 and tensor.shape[0] == num_rows:
            return select_rows(tensor, 0, on_device[tensor.device])
        return tensor

    return apply_to_collection(batch, Tensor, select)


def split_batch(batch: Any, segment_length: int, time_dim: int = 1) -> list[Any]:
    """Cut ``batch`` into consecutive segments of ``segment_length`` steps along ``time_dim``.

    Args:
        batch: Any collection of tensors (see the module documentation for the rule).
        segment_length: Number of time steps per segment; the last segment may be shorter.
        time_dim: The dimension that indexes time in sequence tensors.

    Returns:
        One batch of the same structure per segment, holding views of the original tensors.

    Raises:
        BatchError: If the batch has no sequence length (see :func:`sequence_length`).

    """
    length = sequence_length(batch, time_dim)
    return [slice_batch(batch, start, stop, time_dim) for start, stop in segment_bounds(length, segment_length)]
