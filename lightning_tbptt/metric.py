"""``MaskedMetric``: any torchmetrics metric, updated only with the time steps that count.

Example:
    >>> import torch
    >>> from torchmetrics.classification import BinaryAccuracy
    >>> metric = MaskedMetric(BinaryAccuracy())
    >>> preds = torch.tensor([[1, 1, 0], [0, 1, 1]])
    >>> target = torch.tensor([[1, 0, 1], [0, 0, 0]])
    >>> mask = torch.tensor([[True, False, False], [True, False, False]])
    >>> metric(preds, target, mask=mask)
    tensor(1.)

"""

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric

from lightning_tbptt.errors import ConfigurationError
from lightning_tbptt.loss import resolve_mask


class MaskedMetric(WrapperMetric):
    """Wraps a metric so that it only sees the valid time steps of per-step predictions and targets.

    ``preds`` and ``target`` have batch and time as their first two dimensions (``(B, T, ...)``, or ``(T, B, ...)`` with
    ``time_dim=0``); the selected steps reach the wrapped metric as ``preds[mask]`` and ``target[mask]``, i.e. with
    shapes ``(N, ...)``. The mask is the running segment's during a fit with ``TBPTTCallback``, or the ``mask=``
    argument anywhere (validation, testing, plain PyTorch). Synchronisation across processes, state and ``compute`` are
    the wrapped metric's own, so it logs, resets and checkpoints like any metric.

    Args:
        metric: The metric to wrap, e.g. ``MulticlassAccuracy(num_classes=5)``.
        kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ConfigurationError: If ``metric`` is not a ``torchmetrics.Metric``.

    """

    def __init__(self, metric: Metric, **kwargs: Any) -> None:
        if not isinstance(metric, Metric):
            raise ConfigurationError(
                f"Expected argument `metric` to be a torchmetrics `Metric` but got {type(metric).__name__}. Wrap a"
                " metric instance, e.g. `MaskedMetric(MulticlassAccuracy(num_classes=5))`."
            )
        super().__init__(**kwargs)
        self.metric = metric

    def _select(self, preds: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        mask = resolve_mask(mask, preds, target, names=("preds", "target"))
        return preds[mask], target[mask]

    def update(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Update the wrapped metric with the valid steps of ``preds`` and ``target`` (none: it is left as it is)."""
        selected = self._select(preds, target, mask)
        if len(selected[0]):  # many metrics refuse an empty update (classification ones raise)
            self.metric.update(*selected)
        self._update_count += 1

    def forward(self, preds: Tensor, target: Tensor, mask: Tensor | None = None) -> Any:
        """Update the wrapped metric and return its value on these steps alone (NaN where no step is valid)."""
        selected = self._select(preds, target, mask)
        # none selected: NaN, as a torchmetrics mean over no values, the wrapped metric left as it is
        value: Any = self.metric(*selected) if len(selected[0]) else torch.tensor(float("nan"), device=preds.device)
        self._forward_cache = value
        self._update_count += 1
        return self._forward_cache

    def compute(self) -> Any:
        """Return the wrapped metric's value over every step it has seen."""
        return self.metric.compute()

    def reset(self) -> None:
        """Reset the wrapped metric."""
        super().reset()
        self.metric.reset()

    def set_dtype(self, dst_type: str | torch.dtype) -> "MaskedMetric":
        """Convert the wrapped metric's state to ``dst_type``."""
        super().set_dtype(dst_type)
        self.metric.set_dtype(dst_type)
        return self

    def persistent(self, mode: bool = False) -> None:
        """Make the wrapped metric's state part of ``state_dict`` (``True``) or not (``False``, the default)."""
        self.metric.persistent(mode)
