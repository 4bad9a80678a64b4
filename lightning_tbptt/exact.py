"""Exact gradients through a whole batch at the memory of one segment (``TBPTTCallback(exact=True)``).

The gradient of the summed segment losses, backpropagated through the whole batch, is computed one segment at a time
(Gruslys et al. 2016, "Memory-Efficient Backpropagation Through Time", with one checkpoint per segment):

1. a *first pass* runs every segment's ``training_step`` forward without gradient, keeping the carried state at each
   boundary between segments (detached: a few numbers per row) and the random number generators' state before each
   segment;
2. a *recomputation* runs the segments again, last to first, each with gradient, from its stored boundary state made a
   leaf that requires grad, and with the random numbers of its first run. Its loss is joined to the state it ends
   with (:class:`Link`): backpropagating the loss also backpropagates, into that end state, the gradient that reached
   the next segment's boundary leaf. The gradient that reaches this segment's own boundary leaf goes on to the segment
   before.

So after the last recomputed segment (the batch's first) every parameter holds the gradient of the full, untruncated
backward, and only one segment's graph existed at a time. The loss itself is unchanged in value (the join adds
nothing to it), so Lightning's own backward path (precision plugins, loss scaling, the division by
``accumulate_grad_batches``) applies as usual: the gradient arriving at each segment's loss is read in backward and the
carried gradient rescaled by it, whatever factor that path applies.

Example (a two-segment LSTM batch, checked against one backward through the whole sequence):
    >>> import torch
    >>> from lightning_tbptt.state import StateCarrier
    >>> _ = torch.manual_seed(0)
    >>> lstm = torch.nn.LSTM(2, 3, batch_first=True).double()
    >>> x = torch.randn(4, 6, 2, dtype=torch.float64)
    >>> params = list(lstm.parameters())
    >>> full = torch.autograd.grad(lstm(x)[0].pow(2).sum(), params)
    >>> carrier = StateCarrier({"lstm": lstm})
    >>> with torch.no_grad(), carrier.segment():  # the first pass: keep the boundary state
    ...     _ = lstm(x[:, :3])
    >>> boundary = Boundary(carrier.carried, {})
    >>> grads, link = [torch.zeros_like(p) for p in params], Link()
    >>> for piece, start in ((x[:, 3:], boundary), (x[:, :3], None)):  # the recomputation, last segment first
    ...     leaves = start.leaves() if start is not None else {}
    ...     carrier.carried.clear()
    ...     carrier.carried.update(leaves)
    ...     with carrier.segment():
    ...         joined = link.join(lstm(piece)[0].pow(2).sum(), carrier.returned_states())
    ...     parts = torch.autograd.grad(joined, [*params, *tensors_of(leaves)])
    ...     grads = [g + p for g, p in zip(grads, parts[:4])]
    ...     link = link.into_previous(leaves, list(parts[4:]))
    >>> all(torch.allclose(g, f) for g, f in zip(grads, full))
    True
    >>> carrier.remove()

"""

import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_tbptt.errors import BatchError


def tensors_of(states: Mapping[str, Any]) -> list[Tensor]:
    """Every tensor of ``states`` (module name → nested state), in a fixed order."""
    found: list[Tensor] = []
    for name in sorted(states):
        apply_to_collection(states[name], Tensor, found.append)
    return found


def _leaf(tensor: Tensor) -> Tensor:
    leaf = tensor.detach()
    return leaf.requires_grad_() if leaf.is_floating_point() or leaf.is_complex() else leaf


class BoundaryStore:
    """Keeps the state at every boundary of a batch in preallocated tensors, one per state tensor and kind.

    Thousands of small tensors allocated one per segment, between the segment's large temporary buffers, would pin
    those buffers' memory in the host allocator's heap (measured: the resident memory then grows with the sequence,
    though only the small tensors stay alive); one allocation per batch does not. A tensor of another shape than the
    first one kept in its place (rows dropped with ``drop_finished``) is copied on its own.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._slots: dict[tuple[int, tuple[int, ...], torch.dtype, torch.device], Tensor] = {}

    def keep(self, tensor: Tensor, position: int, place: int) -> Tensor:
        """A copy of ``tensor``, the ``place``-th tensor kept at boundary ``position``."""
        key = (place, tuple(tensor.shape), tensor.dtype, tensor.device)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = tensor.new_empty((self.count, *tensor.shape))
        return slots[position].copy_(tensor)

    def keep_state(self, carried: Mapping[str, Any], position: int) -> dict[str, Any]:
        """A copy of every tensor of the carried states ``carried``, kept at boundary ``position``."""
        place = itertools.count()
        return {
            name: apply_to_collection(carried[name], Tensor, lambda t: self.keep(t.detach(), position, next(place)))
            for name in sorted(carried)
        }


@dataclass
class Boundary:
    """The carried state at the start of one segment (as the first pass left it), and what the recomputation needs."""

    carried: dict[str, Any]
    """The carried state of each module, detached."""
    rows: dict[str, tuple[Tensor | None, int]]
    """The rows each module's state holds (see :class:`~lightning_tbptt.state.CarriedState`)."""
    random: "RandomState | None" = None
    """The random number generators' state before the segment's first run."""

    def __post_init__(self) -> None:
        self.carried = dict(self.carried)
        self.rows = dict(self.rows)

    def install(self, state: Any, carried: dict[str, Any] | None = None) -> None:
        """Make ``state`` (a :class:`~lightning_tbptt.state.CarriedState`) carry this boundary's state.

        ``carried``: carry that instead (e.g. its :meth:`leaves`), with this boundary's rows.
        """
        state.carried.clear()
        state.carried.update(self.carried if carried is None else carried)
        state.rows.clear()
        state.rows.update(self.rows)

    def leaves(self) -> dict[str, Any]:
        """The carried state as fresh leaves that require grad (floating-point tensors)."""
        return {name: apply_to_collection(state, Tensor, _leaf) for name, state in self.carried.items()}


class Link:
    """The gradient carried from a segment's start back into the end state of the segment before it.

    ``incoming`` holds, per module, the gradients that reached the later segment's boundary leaves divided by the
    gradient that reached that segment's loss, so that a factor the backward path applies to every loss (a loss scale,
    ``1/N`` for accumulation) is applied once per segment rather than compounded from segment to segment.
    """

    def __init__(self, incoming: dict[str, list[Tensor | None]] | None = None) -> None:
        self.incoming = incoming or {}
        self.scale: Tensor | None = None
        """The gradient that reached the joined loss in backward (set by the backward)."""
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def join(self, loss: Tensor, ends: Mapping[str, Any]) -> Tensor:
        """``loss``, unchanged in value, whose backward also sends the incoming gradients into the end states ``ends``.

        Without incoming gradients (the batch's last segment) nothing is sent, but the gradient the loss receives is
        still recorded (:attr:`scale`), for the link into the segment before.
        """
        self.pairs = []
        for name, gradients in self.incoming.items():
            if name not in ends:
                continue
            for end, gradient in zip(tensors_of({name: ends[name]}), gradients, strict=True):
                if gradient is not None and end.requires_grad:
                    self.pairs.append((end, gradient))
        joined: Tensor = _Joined.apply(loss, self, *(end for end, _ in self.pairs))
        return joined

    def into_previous(
        self, leaves: Mapping[str, Any], grads: "list[Tensor | None]", passed: Sequence[str] = ()
    ) -> "Link":
        """The link into the previous segment, after this link's loss was backpropagated.

        ``grads`` are the gradients of ``leaves`` (in :func:`tensors_of` order). ``passed`` names the modules the
        segment did not call: their state crossed it unchanged, so their incoming gradient is added to their leaves'
        and passes on.
        """
        scale = self.scale
        incoming: dict[str, list[Tensor | None]] = {}
        position = 0
        for name in sorted(leaves):
            count = len(tensors_of({name: leaves[name]}))
            part = grads[position : position + count]
            position += count
            if scale is not None:
                part = [None if g is None else g / scale for g in part]
            if name in passed and name in self.incoming:
                part = [_added(g, h) for g, h in zip(part, self.incoming[name], strict=True)]
            incoming[name] = part
        return Link(incoming)


def _added(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class _Joined(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, loss: Tensor, link: Link, *ends: Tensor) -> Tensor:
        ctx.link = link
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        link: Link = ctx.link
        link.scale = grad.detach()
        sent = [(grad * gradient).to(end.dtype) for end, gradient in link.pairs]
        return (grad, None, *sent)


@dataclass
class RandomState:
    """The state of the CPU generator and of the generators of the CUDA devices in use."""

    cpu: Tensor
    devices: list[int] = field(default_factory=list)
    cuda: list[Tensor] = field(default_factory=list)

    @classmethod
    def capture(cls, devices: list[int], store: BoundaryStore | None = None, position: int = 0) -> "RandomState":
        """The generators' state now (kept in ``store`` at boundary ``position``, if given)."""
        states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
        if store is not None:
            states = [store.keep(state, position, -1 - place) for place, state in enumerate(states)]
        return cls(states[0], devices, states[1:])

    def restore(self) -> None:
        """Set the generators back to this state."""
        # (from a copy: `torch.set_rng_state` crashes on a view that starts inside its storage, as kept states are)
        torch.set_rng_state(self.cpu.clone())
        for device, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state.clone(), device)


def cuda_devices(module: nn.Module) -> list[int]:
    """The CUDA devices ``module``'s parameters and buffers are on (whose generators its random numbers come from)."""
    found = {t.device.index or 0 for t in (*module.parameters(), *module.buffers()) if t.device.type == "cuda"}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        found.add(torch.cuda.current_device())
    return sorted(found)


@contextmanager
def replayed(devices: list[int]) -> Iterator[None]:
    """While active, generators may be set to earlier states; afterwards they are as before (``fork_rng``)."""
    with torch.random.fork_rng(devices=devices):
        yield


def draws_from_cudnn(module: nn.Module) -> bool:
    """Whether ``module`` has a ``torch.nn`` RNN on CUDA that cuDNN would run with dropout between its layers.

    cuDNN draws those masks from a dropout state of its own, which no generator sets back: a recomputed segment would
    draw other masks than its first run (seen on an H200 by ``benchmarks/gpu_check.py``, check 5c).
    """
    return torch.backends.cudnn.enabled and any(
        isinstance(each, nn.RNNBase)
        and each.training
        and each.dropout > 0
        and each.num_layers > 1
        and any(parameter.is_cuda for parameter in each.parameters())
        for each in module.modules()
    )


def replayable(module: nn.Module) -> AbstractContextManager[None]:
    """Turns cuDNN off while ``module`` :func:`draws_from_cudnn` (PyTorch's own RNN kernels draw from the generator)."""
    return cudnn_off() if draws_from_cudnn(module) else nullcontext()


def cudnn_off() -> AbstractContextManager[None]:
    """Turns cuDNN off, its other settings as they are (``cudnn.flags`` resets those it is not given to defaults)."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(
        enabled=False,
        benchmark=cudnn.benchmark,
        benchmark_limit=cudnn.benchmark_limit,
        deterministic=cudnn.deterministic,
        allow_tf32=cudnn.allow_tf32,
    )


_METRIC_EXTRAS = ("_update_count", "_computed", "_forward_cache")


@contextmanager
def frozen_metrics(module: nn.Module) -> Iterator[None]:
    """While active, the ``torchmetrics`` metrics among ``module``'s submodules change; afterwards they are as before.

    So the recomputation does not count a step the first pass counted already.
    """
    from torchmetrics import Metric

    saved: list[tuple[Metric, dict[str, Any]]] = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            names = [*getattr(metric, "_defaults", {}), *(n for n in _METRIC_EXTRAS if hasattr(metric, n))]
            saved.append((metric, {name: _copied(getattr(metric, name)) for name in names}))
    try:
        yield
    finally:
        for metric, values in saved:
            for name, value in values.items():
                setattr(metric, name, value)


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return list(value)
    return value


def joined_output(output: Any, join: Any, segment: int) -> Any:
    """``training_step``'s ``output`` with its loss passed through ``join`` (a tensor, or the ``"loss"`` of a dict).

    Raises:
        BatchError: If the output holds no loss: without a backward through this segment the gradient of the segments
            before it would be lost.

    """
    if isinstance(output, Tensor):
        return join(output)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": join(output["loss"])}
    raise BatchError(
        f"Expected `training_step` to return a loss for every segment with `TBPTTCallback(exact=True)` but segment"
        f" {segment} returned {type(output).__name__}: the exact gradient of a batch flows through every segment's"
        " backward, so a segment cannot be skipped. Return a loss (e.g. `loss * 0` for a segment without targets), or"
        " use `exact=False`."
    )
