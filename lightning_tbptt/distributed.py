"""Several processes (DDP): every process runs the same number of optimisation steps per batch.

Under data parallelism each optimizer step all-reduces the gradients of every process, so every process must run the
same sequence of steps. With variable lengths (segments of padding only are not run, rows are dropped), dynamic padding
or a custom ``split_batch``, the processes' batches can have different numbers of segments. So, once per batch, the
processes agree on the largest number (one all-reduce of two integers), and a process whose batch has fewer segments
takes part in each remaining step of the others with *zero gradients*: it runs, instead of ``training_step``, a loss
of ``0 * sum(parameters)`` through the same Lightning path (DDP forward, backward, gradient synchronisation, clipping,
optimizer step), and logs nothing. This is what PyTorch's own ``Join`` does for uneven inputs: the step's gradient is
the sum over the processes that still had a segment, divided by the number of processes — the same as if the idle
process had run a segment of padding only with a masked loss.

Only strategies that synchronise gradients by all-reduce can do that (DDP and its variants); with other multi-process
strategies (sharded ones, DeepSpeed) or with manual optimization the processes must have equal counts, else every
process raises :class:`~lightning_tbptt.errors.BatchError` at once.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tbptt.errors import BatchError


def _is_ddp(strategy: Any) -> bool:
    # by name: the same class exists in both namespaces (`pytorch_lightning`, `lightning.pytorch`)
    return any(cls.__name__ == "DDPStrategy" for cls in type(strategy).__mro__)


def agree_on_segment_count(trainer: Any, count: int, *, automatic: bool) -> int:
    """Return the largest number of segments any process has in its current batch (``count`` with one process).

    Raises:
        BatchError: On every process at once, if the processes' counts differ and this strategy or manual optimization
            cannot take part in a step without a segment.

    """
    if trainer.world_size <= 1:
        return count
    strategy = trainer.strategy
    counts = torch.tensor([count, -count], dtype=torch.long, device=strategy.root_device)
    most, fewest = (int(value) for value in strategy.reduce(counts, reduce_op="max").tolist())
    fewest = -fewest
    if most == fewest:
        return most
    if not automatic:
        reason = (
            "the module uses manual optimization, so a process without a segment cannot take part in the optimizer"
            " steps its `training_step` makes"
        )
    elif not _is_ddp(strategy) or strategy.handles_gradient_accumulation:
        reason = (
            f"the strategy {type(strategy).__name__} cannot take part in a step without running the model (only DDP"
            " strategies, which all-reduce gradients, can contribute zero gradients)"
        )
    else:
        return most
    raise BatchError(
        f"Expected every process to run the same number of segments in this batch, but they run between {fewest} and"
        f" {most}, and {reason}. Give every process batches of the same padded length (and, with `lengths`, whose"
        " longest sequence ends in the same segment), or use `strategy='ddp'` with automatic optimization."
    )


def _zero_loss(module: nn.Module) -> Tensor | None:
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    if not trainable:
        return None
    total: Tensor = sum((parameter.sum() for parameter in trainable), start=torch.zeros((), device=trainable[0].device))
    return total * 0.0


@contextmanager
def idle_training_step(module: nn.Module) -> Iterator[None]:
    """While active, ``module.training_step`` returns ``0 * sum(parameters)``: every parameter gets a zero gradient.

    The user's step is not called, so nothing is logged and no state is carried. Shadowed on the instance and
    restored afterwards.
    """
    shadowed = vars(module)
    previous = shadowed.get("training_step")

    def training_step(*args: Any, **kwargs: Any) -> Tensor | None:
        return _zero_loss(module)

    shadowed["training_step"] = training_step
    try:
        yield
    finally:
        if previous is None:
            del shadowed["training_step"]
        else:
            shadowed["training_step"] = previous
