"""What truncation costs: the truncation-bias probe, and the segment length it chooses (``segment_length="auto"``).

Truncated BPTT with segments of ``k`` steps drops, for a loss at step ``t``, every gradient path that crosses a segment
boundary before ``t``. The *relative bias* of the truncated gradient is what it drops, as a share of the exact gradient:
``‖g_exact - g_k‖ / ‖g_exact‖``, both gradients of the same summed loss with respect to the parameters. The probe
measures it on the first ``horizon`` steps of a batch (its *span*), for several candidate lengths at once
(:func:`candidate_lengths`):

1. the span is cut into *bands* (of the greatest common divisor of the candidates) and each band's ``training_step``
   runs forward with gradient from its start state made a leaf, keeping the graph of every band
   (:class:`ProbedBand`);
2. backward sweeps from the last band to the first (:func:`sweep`) pass each band's start-state gradient on to the band
   before, as ``exact=True`` does, from the losses of the bands in the span's second half (:func:`scored_from`); a
   sweep for candidate ``c`` drops it at every multiple of ``c``, which is TBPTT with segments of ``c``; a sweep that
   drops it nowhere is the exact gradient. One more sweep, from the last band's loss alone, measures how the norm of
   the gradient decays with the distance it travels back through the carried state (:attr:`ProbeResult.decay`).

So the biases are measured, not modelled: on the span and rows probed they are exactly what ``exact=True`` against
``step_per="batch"`` would give for a loss on the span's second half. Only that half is scored because the history
before the span's start is cut in both gradients: each loss that counts has at least half the span behind it. They
estimate the bias on whole batches as far as the span is typical of them and half of it covers the dependencies that
matter (choose a horizon of several segments; the default is four).

Example (an LSTM whose loss sits at the end of the span; truncation shorter than the span drops the whole path):
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> lstm = nn.LSTM(1, 4).double()
    >>> params = list(lstm.parameters())
    >>> x = torch.randn(8, 2, 1, dtype=torch.float64)
    >>> bands, state = [], None
    >>> for start in range(0, 8, 2):
    ...     leaves = {} if state is None else {"lstm": tuple(s.detach().requires_grad_() for s in state)}
    ...     out, state = lstm(x[start : start + 2], leaves.get("lstm"))
    ...     loss = out[-1].sum() if start == 6 else None
    ...     bands.append(ProbedBand(start, 2, loss, leaves, {"lstm": state}))
    >>> exact, cut = sweep(bands, params), sweep(bands, params, cut_every=4)
    >>> round(relative_difference(exact, cut), 3) > 0, relative_difference(exact, sweep(bands, params, cut_every=8))
    (True, 0.0)

"""

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_tbptt.errors import ModelError
from lightning_tbptt.exact import tensors_of


@dataclass(frozen=True)
class ProbeSettings:
    """When the probe runs, what it measures, and how ``segment_length="auto"`` follows it."""

    every: int
    """Probe every ``every``-th training batch of the fit, the first included."""
    tolerance: float = 0.1
    """The relative bias ``δ`` a segment length may have (the suggested length is the shortest below it)."""
    horizon: int | None = None
    """Time steps probed, from the start of the batch (``None``: 4 × the segment length; with ``"auto"``,
    2 × ``max_segment_length``)."""
    auto: bool = False
    """Whether the probe chooses the segment length (``segment_length="auto"``)."""
    min_length: int = 8
    """With ``"auto"``: the shortest segment length, and the step of its grid ``min_length · 2**i``."""
    max_length: int = 512
    """With ``"auto"``: the longest segment length (the largest grid value not above it is used)."""

    def span(self, segment_length: int) -> int:
        """The time steps probed, with segments of ``segment_length`` steps."""
        if self.horizon is not None:
            return self.horizon
        return 2 * self.longest if self.auto else 4 * segment_length

    @property
    def longest(self) -> int:
        """The longest length of the ``"auto"`` grid."""
        length = self.min_length
        while 2 * length <= self.max_length:
            length *= 2
        return length


@dataclass(frozen=True)
class ProbeResult:
    """What one probe measured (kept in :attr:`~lightning_tbptt.TBPTTCallback.probe_result`)."""

    batch: int
    """The training batch probed, counted over the fit (0-based)."""
    global_step: int
    """``trainer.global_step`` when the probe ran (before the batch's optimizer steps)."""
    segment_length: int
    """The segment length in use when the probe ran (with ``"auto"``, the probed batch then trains with
    :attr:`next_length`)."""
    span: int
    """Time steps probed: the horizon rounded up to a whole number of bands, or the batch's length if shorter."""
    band: int
    """Time steps per band (the candidates are multiples of it)."""
    tolerance: float
    biases: dict[int, float]
    """Candidate segment length → measured relative bias of the truncated gradient (lengths shorter than the span)."""
    decay: tuple[tuple[int, float], ...]
    """``(distance, norm)``: the norm of the gradient of the last band's loss reaching the carried state ``distance``
    steps before that band's start, divided by the norm at distance 0."""
    decay_rate: float | None
    """The per-step factor of a geometric fit of :attr:`decay` (``None`` with fewer than two positive points)."""
    seconds: float
    """Wall time of the probe."""
    next_length: int | None = None
    """With ``"auto"``: the segment length chosen for the next batches."""

    @property
    def bias(self) -> float | None:
        """The relative bias at the segment length in use (``None`` when it is not shorter than the span)."""
        return self.biases.get(self.segment_length)

    @property
    def suggested(self) -> int | None:
        """The shortest candidate length whose bias is at most the tolerance.

        ``None`` if no candidate shorter than the span is (the span is then too short to tell: raise the horizon).
        """
        fitting = [length for length, bias in sorted(self.biases.items()) if bias <= self.tolerance]
        return fitting[0] if fitting else None

    def metrics(self) -> dict[str, float]:
        """The values logged, under ``tbptt/`` names."""
        values = {"tbptt/probe_seconds": self.seconds, "tbptt/probe_segment_length": float(self.segment_length)}
        if self.bias is not None:
            values["tbptt/probe_bias"] = self.bias
        if self.suggested is not None:
            values["tbptt/probe_suggested_length"] = float(self.suggested)
        if self.decay_rate is not None:
            values["tbptt/probe_decay_rate"] = self.decay_rate
        if self.next_length is not None:
            values["tbptt/segment_length"] = float(self.next_length)
        return values


def candidate_lengths(settings: ProbeSettings, segment_length: int, span: int) -> list[int]:
    """The segment lengths whose bias a probe measures: shorter than ``span``, and always ``segment_length``'s grid.

    Fixed length ``k``: ``k/4, k/2, k, 2k, 4k, ...`` (those that are whole numbers). ``"auto"``: its grid
    ``min_length · 2**i`` up to the longest length.

    Example:
        >>> candidate_lengths(ProbeSettings(every=1), 64, 256)
        [16, 32, 64, 128]
        >>> candidate_lengths(ProbeSettings(every=1), 35, 140)
        [35, 70]
        >>> candidate_lengths(ProbeSettings(every=1, auto=True, min_length=8, max_length=100), 64, 128)
        [8, 16, 32, 64]

    """
    if settings.auto:
        lengths = []
        length = settings.min_length
        while length <= settings.longest:
            lengths.append(length)
            length *= 2
    else:
        lengths = [segment_length // d for d in (4, 2) if segment_length % d == 0]
        length = segment_length
        while length < span:
            lengths.append(length)
            length *= 2
    return sorted({length for length in lengths if length < span})


def band_length(lengths: Sequence[int], segment_length: int) -> int:
    """The band of a probe: the greatest common divisor of the candidates (and of the segment length)."""
    return math.gcd(segment_length, *lengths)


@dataclass
class ProbedBand:
    """One band of a probe's span, run forward with gradient: what the backward sweeps need."""

    start: int
    """First time step of the band within the batch."""
    length: int
    loss: Tensor | None
    """The band's loss (``None``: its ``training_step`` returned none)."""
    leaves: dict[str, Any]
    """The carried state the band started from (module name → state), as leaves that require grad; empty for the
    span's first band."""
    ends: dict[str, Any]
    """The state each module called in the band returned (with its graph)."""
    passed: list[str] = field(default_factory=list)
    """The modules of ``leaves`` the band did not call: their state crosses the band unchanged."""


Gradients = dict[str, list[Tensor | None]]


def sweep(
    bands: Sequence[ProbedBand],
    parameters: Sequence[Tensor],
    *,
    cut_every: int | None = None,
    losses_from: int = 0,
    on_boundary: Callable[[int, Gradients], None] | None = None,
) -> list[Tensor]:
    """The gradient of the bands' summed losses with respect to ``parameters``, backpropagated band by band.

    The start-state gradient of each band goes into the end state of the band before, except at a band whose start is
    a multiple of ``cut_every`` (TBPTT with segments of ``cut_every`` steps). ``losses_from``: only the losses of the
    bands from that index on count. ``on_boundary(j, gradients)`` sees the gradient reaching band ``j``'s start state.
    The graphs are kept (``retain_graph``), so that several sweeps can run over the same bands.
    """
    total = [torch.zeros_like(p) for p in parameters]
    incoming: Gradients = {}
    for position in reversed(range(len(bands))):
        band = bands[position]
        outputs: list[Tensor] = []
        seeds: list[Tensor] = []
        if position >= losses_from and band.loss is not None and band.loss.requires_grad:
            outputs.append(band.loss)
            seeds.append(torch.ones_like(band.loss))
        for name, gradients in incoming.items():
            if name in band.ends:
                for end, gradient in zip(tensors_of({name: band.ends[name]}), gradients, strict=True):
                    if gradient is not None and end.requires_grad:
                        outputs.append(end)
                        seeds.append(gradient.to(end.dtype))
        leaves = tensors_of(band.leaves)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found: list[Tensor | None] = [None] * len(leaves)
        if outputs:
            grads = torch.autograd.grad(outputs, [*parameters, *wanted], seeds, retain_graph=True, allow_unused=True)
            for accumulated, grad in zip(total, grads[: len(parameters)], strict=True):
                if grad is not None:
                    accumulated.add_(grad)
            leaf_grads = iter(grads[len(parameters) :])
            found = [next(leaf_grads) if leaf.requires_grad else None for leaf in leaves]
        reached: Gradients = {}
        offset = 0
        for name in sorted(band.leaves):
            count = len(tensors_of({name: band.leaves[name]}))
            part = found[offset : offset + count]
            offset += count
            if name in band.passed and name in incoming:
                part = [_added(a, b) for a, b in zip(part, incoming[name], strict=True)]
            reached[name] = part
        if on_boundary is not None:
            on_boundary(position, reached)
        incoming = {} if cut_every is not None and band.start % cut_every == 0 else reached
    return total


def _added(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _norm(tensors: Sequence[Tensor | None]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors if t is not None))


def relative_difference(exact: Sequence[Tensor], other: Sequence[Tensor]) -> float:
    """``‖exact - other‖ / ‖exact‖`` over all tensors together (0 when ``exact`` is zero)."""
    reference = _norm(exact)
    if reference == 0:
        return 0.0
    return _norm([a - b for a, b in zip(exact, other, strict=True)]) / reference


def decay_rate(decay: Sequence[tuple[int, float]]) -> float | None:
    """The factor per step of the geometric fit ``norm ≈ rate ** distance`` (least squares on the logarithms).

    Example:
        >>> round(decay_rate([(0, 1.0), (2, 0.25), (4, 0.0625)]), 6)
        0.5

    """
    points = [(d, math.log(n)) for d, n in decay if n > 0]
    if len(points) < 2 or len({d for d, _ in points}) < 2:
        return None
    mean_d = sum(d for d, _ in points) / len(points)
    mean_l = sum(v for _, v in points) / len(points)
    slope = sum((d - mean_d) * (v - mean_l) for d, v in points) / sum((d - mean_d) ** 2 for d, _ in points)
    return math.exp(slope)


def scored_from(bands: Sequence[ProbedBand]) -> int:
    """The first band whose loss counts in the biases: the first to start in the second half of the span.

    The losses of the first half are left out because the history before the span's start is cut in the exact
    gradient too: a loss near the start would count as unbiased only for want of history. Every loss that counts has
    at least half the span behind it.
    """
    span = bands[-1].start + bands[-1].length
    return next(position for position, band in enumerate(bands) if 2 * band.start >= span or band is bands[-1])


def measure(
    bands: Sequence[ProbedBand], parameters: Sequence[Tensor], lengths: Sequence[int], module: str = "the model"
) -> tuple[dict[int, float], tuple[tuple[int, float], ...]]:
    """The relative bias of each candidate length, and the decay of the last band's gradient with distance.

    The biases are those of the losses of the span's second half (:func:`scored_from`), backpropagated through the
    whole span. None are measured (an empty dict) when those losses give no gradient at all (no scored step there).

    Raises:
        ModelError: If no gradient reaches any carried state: the truncation would then drop nothing, because the
            state cannot take a gradient (detached or not floating-point inside the module).

    """
    reached_any = False

    def seen(position: int, reached: Gradients) -> None:
        nonlocal reached_any
        gradients = [g for gs in reached.values() for g in gs if g is not None]
        reached_any = reached_any or any(bool(g.abs().sum() > 0) for g in gradients)

    first = scored_from(bands)
    exact = sweep(bands, parameters, losses_from=first, on_boundary=seen)
    scored = _norm(exact) > 0
    if len(bands) > 1 and scored and not reached_any:
        raise ModelError(
            f"The truncation probe found no gradient reaching the carried state of {module} at any band boundary, so"
            " its state cannot take a gradient (it is detached inside the module, or not floating-point; or the"
            " model passes its recurrent modules a state of its own, so that nothing is carried) and truncation"
            " drops nothing. Carry a state that is part of the graph, or do not probe (`probe_every=None`, a fixed"
            " `segment_length`)."
        )
    biases = {}
    if scored:
        for length in lengths:
            truncated = sweep(bands, parameters, cut_every=length, losses_from=first)
            biases[length] = relative_difference(exact, truncated)
    last = bands[-1].start
    norms: dict[int, float] = {}

    def record(position: int, reached: Gradients) -> None:
        if bands[position].leaves:  # (the span's first band starts from no state, or a constant one)
            norms[last - bands[position].start] = _norm([g for gs in reached.values() for g in gs])

    sweep(bands, parameters, losses_from=len(bands) - 1, on_boundary=record)
    reference = norms.get(0, 0.0)
    decay = tuple(sorted((d, n / reference if reference > 0 else 0.0) for d, n in norms.items()))
    return biases, decay


def next_length(current: int, suggested: int | None, settings: ProbeSettings, batch_length: int | None = None) -> int:
    """The ``"auto"`` segment length after a probe: towards the suggestion, at most doubling or halving.

    No suggestion (no candidate shorter than the span was below the tolerance) means longer. With ``batch_length``,
    never beyond the shortest grid length that holds the whole batch (longer segments would train the same single
    segment), which it may jump to at once.

    Example:
        >>> auto = ProbeSettings(every=1, auto=True, min_length=8, max_length=64)
        >>> next_length(64, 8, auto), next_length(16, None, auto), next_length(16, 16, auto)
        (32, 32, 16)
        >>> next_length(64, None, auto), next_length(8, 64, auto)
        (64, 16)
        >>> next_length(64, None, auto, batch_length=20), next_length(64, 8, auto, batch_length=20)
        (32, 16)

    """
    longest = settings.longest
    if batch_length is not None:
        whole = settings.min_length
        while whole < batch_length and 2 * whole <= longest:
            whole *= 2
        longest = whole
    target = longest if suggested is None else min(suggested, longest)
    current = min(current, longest)  # (what trains does not change: one segment holds the batch either way)
    if target > current:
        return min(2 * current, longest)
    if target < current:
        return max(current // 2, target, settings.min_length)
    return current


@dataclass
class Timer:
    """Seconds since it was made."""

    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        """Seconds since the timer was made."""
        return time.perf_counter() - self.started


def loss_of(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` output (a tensor, or the ``"loss"`` of a dict), or ``None``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        loss: Tensor = output["loss"]
        return loss
    return None


def trainable(parameters: Iterator[Tensor]) -> list[Tensor]:
    """The parameters that take a gradient."""
    return [p for p in parameters if p.requires_grad]
