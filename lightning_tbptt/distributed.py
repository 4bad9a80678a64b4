"""Several processes (DDP): every process runs the same number of optimisation steps per batch.

Under data parallelism each optimizer step all-reduces the gradients of every process, so every process must run the
same sequence of steps. With variable lengths (segments of padding only are not run, rows are dropped), dynamic padding
or a custom ``split_batch``, the processes' batches can have different numbers of segments. So, once per batch, the
processes agree on the largest number (one all-reduce of three integers), and a process whose batch has fewer segments
takes part in each remaining step of the others with *zero gradients*: it runs, instead of ``training_step``, a loss
of zero times its parameters through the same Lightning path (DDP forward, backward, gradient synchronisation,
clipping, optimizer step), and logs nothing. This is what PyTorch's own ``Join`` does for uneven inputs: the step's
gradient is the sum over the processes that still had a segment, divided by the number of processes.

Only DDP can do that; other multi-process strategies (sharded ones, DeepSpeed), manual optimization, DDP with a static
graph and models with ``SyncBatchNorm`` need equal counts, else every process raises
:class:`~lightning_tbptt.errors.BatchError` at once. A process whose batch fails to be planned tells the others through
the same all-reduce, and then sends them its error, so they raise too rather than wait, quoting it.
"""

from typing import Any

import torch
from torch import Tensor, nn

from lightning_tbptt._lightning_internals import shadowed_training_step
from lightning_tbptt.errors import BatchError


def _is_ddp(strategy: Any) -> bool:
    # by name: the same class exists in both namespaces (`pytorch_lightning`, `lightning.pytorch`)
    return any(cls.__name__ == "DDPStrategy" for cls in type(strategy).__mro__)


def _wrapped(strategy: Any) -> Any:
    """The ``DistributedDataParallel`` wrapping the module, or ``None``."""
    model = getattr(strategy, "model", None)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def _reduce_max(strategy: Any, values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over all processes: one collective."""
    device = strategy.root_device
    tensor = torch.tensor(values, dtype=torch.long, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return [int(value) for value in tensor.tolist()]
    gathered = strategy.all_gather(tensor)  # other process groups (XLA): every process's values
    return [int(value) for value in gathered.reshape(-1, len(values)).max(dim=0).values.tolist()]


def _why_counts_must_match(trainer: Any, automatic: bool) -> str | None:
    strategy = trainer.strategy
    if not automatic:
        return (
            "the module uses manual optimization, so a process without a segment cannot take part in the optimizer"
            " steps its `training_step` makes"
        )
    if not _is_ddp(strategy) or strategy.handles_gradient_accumulation or "XLA" in type(strategy).__name__:
        return (
            f"the strategy {type(strategy).__name__} cannot take part in a step without running the model (only DDP,"
            " which all-reduces gradients, can contribute zero gradients)"
        )
    wrapped = _wrapped(strategy)
    if wrapped is not None and getattr(wrapped, "static_graph", False):
        return "DDP runs with `static_graph=True`, and a step without the model changes the graph"
    if any(isinstance(module, nn.SyncBatchNorm) for module in trainer.lightning_module.modules()):
        return "the model has `SyncBatchNorm` layers, which communicate in every forward pass"
    return None


def _gather_failures(error: BaseException | None) -> list[str]:
    """Every failed process's error, as ``"process <rank>: <Type>: <message>"``: one collective, on failure only.

    Empty without a default process group (other process groups, XLA: the messages cannot be gathered).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    mine = None if error is None else f"{type(error).__name__}: {error}"
    gathered: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return [f"process {rank}: {message}" for rank, message in enumerate(gathered) if message is not None]


def agree_on_segment_count(trainer: Any, count: int, *, automatic: bool, error: BaseException | None = None) -> int:
    """Return the largest number of segments any process has in its current batch (``count`` with one process).

    Args:
        trainer: The ``Trainer``.
        count: This process's number of segments.
        automatic: Whether the module uses automatic optimization.
        error: Why this process could not plan its batch, or ``None``; the process raises it after this call.

    Raises:
        BatchError: On every process at once, if another process could not plan its batch (the message quotes that
            process's error, so the cause reaches the user whichever process's error a launcher shows), or if the
            processes' counts differ and this configuration cannot take part in a step without a segment.

    """
    if trainer.world_size <= 1:
        return count
    most, fewest, failure = _reduce_max(trainer.strategy, [count, -count, int(error is not None)])
    fewest = -fewest
    if failure:
        causes = _gather_failures(error)
        if error is None:
            quoted = "; ".join(causes) if causes else "see its error"
            raise BatchError(
                f"Another process could not plan its batch ({quoted}), so this process stops as well rather than"
                " wait for it. Fix the cause in that process's batch."
            )
    if error is not None or most == fewest:
        return most
    reason = _why_counts_must_match(trainer, automatic)
    if reason is None:
        return most
    raise BatchError(
        f"Expected every process to run the same number of segments in this batch, but they run between {fewest} and"
        f" {most}, and {reason}. Give every process batches of the same padded length (and, with `lengths`, whose"
        " longest sequence ends in the same segment), or use `strategy='ddp'` with automatic optimization."
    )


def _zero_loss(module: nn.Module, strategy: Any) -> Tensor | None:
    trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
    if not trainable:
        return None
    wrapped = _wrapped(strategy)
    if wrapped is not None and wrapped.find_unused_parameters:
        # DDP finds the parameters this step does not use and leaves them to the others: touch one, so that a
        # parameter no process uses keeps no gradient (a zero one would still move it by weight decay or momentum)
        return trainable[0].reshape(-1)[0] * 0.0
    # every parameter must take part in the backward of every step
    total: Tensor = sum((parameter.sum() for parameter in trainable), start=torch.zeros((), device=trainable[0].device))
    return total * 0.0


def idle_training_step(module: nn.Module, strategy: Any) -> Any:
    """While active, ``module.training_step`` returns a zero loss whose gradient is zero for every parameter it reaches.

    The user's step is not called, so nothing is logged and no state is carried. Shadowed on the instance and
    restored afterwards.
    """

    def training_step(*args: Any, **kwargs: Any) -> Tensor | None:
        return _zero_loss(module, strategy)

    return shadowed_training_step(module, training_step)


def agree_on_probe(trainer: Any, length: int, *, error: BaseException | None = None) -> int:
    """After a truncation probe: the longest segment length any process proposes (``length`` with one process).

    Every process probes its own batch; with ``segment_length="auto"`` they go on with the longest length any of them
    needs, so that every process runs the same segments. The same collective as :func:`agree_on_segment_count` (and
    like it, a process whose probe failed tells the others, who raise too rather than wait).

    Raises:
        BatchError: On every other process, if a process's probe failed (the failed one raises its own error).

    """
    if trainer.world_size <= 1:
        return length
    most, _, failure = _reduce_max(trainer.strategy, [length, -length, int(error is not None)])
    if failure:
        causes = _gather_failures(error)
        if error is None:
            quoted = "; ".join(causes) if causes else "see its error"
            raise BatchError(
                f"The truncation probe failed in another process ({quoted}), so this process stops as well rather than"
                " wait for it."
            )
    return most
