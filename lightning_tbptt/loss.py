"""Reducing per-step values over the time steps that count.

Example:
    >>> import torch
    >>> per_step = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    >>> mask = torch.tensor([[True, True, False], [True, False, False]])
    >>> masked_mean(per_step, mask)
    tensor(2.)

Inside ``training_step`` of a fit with ``TBPTTCallback`` the mask defaults to the running segment's::

    loss = masked_mean(F.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))

"""

import torch
from torch import Tensor

from lightning_tbptt.errors import BatchError
from lightning_tbptt.segment import current_segment


def resolve_mask(
    mask: Tensor | None, *tensors: Tensor, names: tuple[str, ...] = ("values",), loss: bool = False
) -> Tensor:
    """Return ``mask`` after checking its shape; by default the running segment's mask, laid out like its sequences.

    With ``loss``, the default is the segment's loss mask (:attr:`~lightning_tbptt.Segment.loss_mask`).

    Raises:
        BatchError: If the mask is not boolean or does not match the leading two dimensions of every tensor.
        NoSegmentError: If no mask is given and no segment is running.

    """
    if mask is None:
        segment = current_segment()
        mask = segment.laid_out(segment.loss_mask) if loss else segment.sequence_mask
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise BatchError(
            f"Expected `mask` to be a 2-D boolean tensor but got dtype {mask.dtype} and shape {tuple(mask.shape)}."
            " Pass a boolean mask laid out like the per-step tensors, e.g. `steps[None, :] < lengths[:, None]` for"
            " batch-first ones."
        )
    for name, tensor in zip(names, tensors, strict=True):
        if tuple(tensor.shape[:2]) != tuple(mask.shape):
            raise BatchError(
                f"Expected `{name}` to start with the mask's shape {tuple(mask.shape)} (batch and time, in the"
                f" layout of the sequence tensors) but got shape {tuple(tensor.shape)}. Pass one value per time step."
            )
    return mask


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Return the mean of per-step ``values`` over the valid time steps.

    Args:
        values: Per-step values (an unreduced loss, say) whose first two dimensions are batch and time, laid out like
            the sequence tensors (``(B, T, ...)``, or ``(T, B, ...)`` with ``time_dim=0``).
        mask: Boolean ``(B, T)`` (or ``(T, B)``) validity mask. Defaults to the running segment's loss mask
            (:attr:`~lightning_tbptt.Segment.loss_mask`: its valid new steps, or with ``loss_on="window"`` every
            valid step of an overlapping window).

    Returns:
        The mean over valid steps (and over any trailing dimensions); 0, with a zero gradient, if none is valid. It
        needs no device synchronisation. Padded steps get a zero gradient, but an operation whose derivative is
        infinite at the padding values (``sqrt`` of zeros, ``log`` of zeros) still yields ``NaN`` gradients: keep
        padding values harmless for the operations applied before the mask.

    Raises:
        BatchError: If ``mask`` does not match ``values``.
        NoSegmentError: If ``mask`` is not given and no segment is running.

    """
    mask = resolve_mask(mask, values, loss=True)
    expanded = mask.reshape(*mask.shape, *([1] * (values.dim() - 2)))
    # accumulate in at least float32: a float16 sum over many steps overflows
    accumulate = torch.promote_types(values.dtype, torch.float32)
    total = values.masked_fill(~expanded, 0).sum(dtype=accumulate)
    per_step = values[0, 0].numel() if values.numel() else 1
    return (total / (mask.sum() * per_step).clamp(min=1)).to(values.dtype)
