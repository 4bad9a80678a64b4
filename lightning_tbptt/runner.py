"""Running a planned batch, segment by segment, without knowing the ``Trainer``.

:class:`SegmentRunner` runs the segments of a :class:`~lightning_tbptt.plan.SegmentPlan`: training segments (each
through a ``run_segment`` callable: Lightning's optimisation path in a fit), burn-in prefixes (without gradient or
optimizer step), the idle steps a process takes part in when other processes have more segments, Lightning 1.x
``hiddens`` threaded from one segment to the next, and evaluation segments (their outputs joined into one per batch).
Around every segment it activates the carried state of the batch's :class:`~lightning_tbptt.streams.Stream` and
:func:`~lightning_tbptt.current_segment`. What touches Lightning is given as callables (:class:`Operations`), so the
runner is tested with plain functions, and a new way to run segments is a new method here.
"""

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_tbptt.compat import returned_hiddens
from lightning_tbptt.exact import Boundary, BoundaryStore, Link, RandomState, joined_output, replayed, tensors_of
from lightning_tbptt.outputs import join_outputs
from lightning_tbptt.plan import PlannedSegment, SegmentPlan
from lightning_tbptt.probe import ProbedBand, loss_of
from lightning_tbptt.schedule import Decision
from lightning_tbptt.segment import Segment, running
from lightning_tbptt.state import StateCarrier
from lightning_tbptt.streams import Stream

RunSegment = Callable[["OrderedDict[str, Any]", Decision | None, int], dict[str, Any]]
"""Runs one training segment: its ``training_step`` arguments, its decision (``None`` in manual optimization) and the
weight of the values it logs (its number of valid time steps)."""


def detached(output: Any) -> Any:
    """``output`` with every tensor in it detached."""
    return apply_to_collection(output, Tensor, Tensor.detach)


def _nothing(*args: Any) -> AbstractContextManager[None]:
    return nullcontext()


@dataclass(frozen=True)
class Operations:
    """What running a segment needs from outside: the ``Trainer``'s part, as callables."""

    to_device: Callable[[PlannedSegment], tuple[Any, Segment]] = lambda planned: (planned.batch, planned.info)
    """Moves a segment to the device; returns it and its :class:`Segment` there."""
    step_without_gradient: Callable[["OrderedDict[str, Any]"], Any] = lambda kwargs: None
    """Calls ``training_step`` outside any optimisation (for burn-in segments)."""
    idle: Callable[[], AbstractContextManager[None]] = _nothing
    """While active, ``training_step`` returns a loss of zero gradient (for idle steps)."""
    silenced: Callable[[], AbstractContextManager[None]] = _nothing
    """While active, the module's ``self.log`` does nothing (for burn-in segments)."""
    weighted: Callable[[int], AbstractContextManager[None]] = _nothing
    """While active, evaluation values logged with ``on_epoch=True`` are weighted by the given number of steps."""
    stopped: Callable[[], bool] = lambda: False
    """Whether training must stop now (``max_steps`` reached)."""
    show: Callable[[int, int, bool], None] = lambda index, count, recomputing: None
    """Shows segment ``index`` of ``count`` (a progress bar), and whether it is being recomputed (``exact``)."""
    step_logged: Callable[["OrderedDict[str, Any]"], Any] = lambda kwargs: None
    """Calls ``training_step`` outside any optimisation, its ``self.log`` values kept (the first pass of ``exact``)."""
    recomputed: Callable[[Callable[[Any], Any]], AbstractContextManager[None]] = _nothing
    """While active, ``training_step`` is recomputed: its ``self.log`` does nothing, the module's metrics are as
    before it once it returns, and what it returns passes through the given function before Lightning sees it."""
    random_devices: Callable[[], list[int]] = lambda: []
    """The CUDA devices whose random number generators the model draws from (besides the CPU's)."""
    replayable: Callable[[], AbstractContextManager[None]] = nullcontext
    """While active, every random number the model draws comes from a generator that can be set back (``exact``)."""


@dataclass(frozen=True)
class Adaptation:
    """What dynamic evaluation does around and after each evaluation segment (see :mod:`lightning_tbptt.dynamic`)."""

    context: Callable[[], AbstractContextManager[Any]]
    """While active, the step runs with autograd (and without what would refuse its backward)."""
    update: Callable[[Any, Any], None]
    """Adapts the weights on the step's output for a segment, given the segment's batch."""
    then: Callable[[], None] | None = None
    """Called once the batch's last segment has been scored (the trained weights come back after a dataloader's last
    batch)."""


@dataclass
class TrainedBatch:
    """What running a training batch left."""

    output: dict[str, Any]
    """The last segment's ``training_step`` output."""
    index: int
    """The index of the last step run (``total - 1`` unless training stopped early)."""
    decision: Decision | None
    """The last step's decision."""


class SegmentRunner:
    """Runs planned batches through a :class:`~lightning_tbptt.state.StateCarrier`.

    Args:
        carrier: Carries the recurrent state of the modules from one segment to the next.
        operations: What running needs from the ``Trainer``.
        time_dim: The time dimension of the batches (for idle steps' :class:`Segment`).
        takes_hiddens: Thread Lightning 1.x ``hiddens`` from each training segment's output into the next.

    """

    def __init__(
        self, carrier: StateCarrier, operations: Operations, *, time_dim: int = 1, takes_hiddens: bool = False
    ) -> None:
        self.carrier = carrier
        self.operations = operations
        self.time_dim = time_dim
        self.takes_hiddens = takes_hiddens
        self.segments_run = 0
        """Training segments run so far (across batches)."""
        self.nonfinite: list[tuple[Tensor, Tensor | None, Segment]] = []
        """With ``reset_nonfinite``: the rows reset, per segment, since the caller last took them."""

    @contextmanager
    def running(self, info: Segment, stream: Stream, carry_at: int | None = None) -> Iterator[None]:
        """Activate the stream's carried state and :func:`~lightning_tbptt.current_segment` for one segment."""
        carrier = self.carrier
        with (
            carrier.segment(info.rows, info.batch_size, info.resets, stream.state, info.length, carry_at),
            running(info),
        ):
            yield
        if carrier.reset_nonfinite:
            self.nonfinite.extend((bad, rows, info) for bad, rows in carrier.take_nonfinite())

    def train(
        self,
        plan: SegmentPlan,
        kwargs: "OrderedDict[str, Any]",
        stream: Stream,
        run_segment: RunSegment,
        *,
        total: int | None = None,
        decide: Callable[[int], Decision | None] = lambda index: None,
    ) -> TrainedBatch:
        """Run the segments of a training batch, then idle steps up to ``total`` (default: the plan's steps).

        Every step's :class:`Segment` counts ``total`` steps (plus the burn-in prefix), so that hooks see the number
        agreed between processes.
        """
        operations = self.operations
        total = plan.steps if total is None else total
        plan.agree(total)
        hiddens = None
        output: dict[str, Any] = {}
        decision = None
        index = -1
        stopped = False
        for planned in plan:
            if planned.info.burn_in:
                self._burn_in(planned, kwargs, stream)
                continue
            index += 1
            segment_kwargs = OrderedDict(kwargs)
            segment_kwargs["batch"], info = operations.to_device(planned)
            if self.takes_hiddens:
                segment_kwargs["hiddens"] = hiddens
            decision = decide(index)
            operations.show(index, total, False)
            with self.running(info, stream, planned.carry_at):
                output = run_segment(segment_kwargs, decision, info.num_valid)
            self.segments_run += 1
            if self.takes_hiddens:
                hiddens = returned_hiddens(output, index)
            stopped = operations.stopped()
            if stopped:
                break
        if not stopped:
            index, decision = self._idle(plan, kwargs, run_segment, index, total, decide, decision)
        return TrainedBatch(output, index, decision)

    def _idle(
        self,
        plan: SegmentPlan,
        kwargs: "OrderedDict[str, Any]",
        run_segment: RunSegment,
        index: int,
        total: int,
        decide: Callable[[int], Decision | None],
        decision: Decision | None,
    ) -> tuple[int, Decision | None]:
        """Other processes have more segments in this batch: take part in each of their steps with zero gradients."""
        operations = self.operations
        count = total + plan.burn_in_segments
        while index < total - 1:
            index += 1
            decision = decide(index)
            segment_kwargs = OrderedDict(kwargs)
            segment_kwargs["batch"] = None
            operations.show(index, total, False)
            idle = Segment(index + plan.burn_in_segments, count, None, 0, self.time_dim, num_valid=0)
            with operations.idle(), running(idle):
                run_segment(segment_kwargs, decision, 0)
            if operations.stopped():
                break
        return index, decision

    def train_exact(
        self,
        plan: SegmentPlan,
        kwargs: "OrderedDict[str, Any]",
        stream: Stream,
        run_segment: RunSegment,
        *,
        total: int | None = None,
        decide: Callable[[int], Decision | None] = lambda index: None,
    ) -> TrainedBatch:
        """Run a training batch for the exact gradient of its summed segment losses (see :mod:`lightning_tbptt.exact`).

        The first pass runs every segment without gradient (its logged values count), keeping each boundary state;
        the recomputation runs them again through ``run_segment``, last to first, each joined to the gradient flowing
        back from the segments after it; then idle steps up to ``total``. The decisions are taken in the order the
        steps run, so with ``step_per="batch"`` only the last recomputed segment (the batch's first) steps. The
        carried state after the batch, and the random number generators, are as the first pass left them.
        """
        operations = self.operations
        total = plan.steps if total is None else total
        plan.agree(total)
        devices = operations.random_devices()
        planned = list(plan)
        output: dict[str, Any] = {}
        decision = None
        link = Link()
        with operations.replayable():  # both passes
            boundaries = self._first_pass(planned, kwargs, stream, total, devices)
            after = Boundary(stream.state.carried, stream.state.rows)
            try:
                with replayed(devices):
                    for index, position in enumerate(reversed(range(len(planned)))):
                        decision = decide(index)
                        segment_output, link = self._recompute(
                            planned[position], boundaries[position], link, kwargs, stream, run_segment, decision, total
                        )
                        output = output or segment_output  # the output of the batch's last segment
            finally:
                after.install(stream.state)
        index, decision = self._idle(plan, kwargs, run_segment, len(planned) - 1, total, decide, decision)
        return TrainedBatch(output, index, decision)

    def _first_pass(
        self,
        planned: list[PlannedSegment],
        kwargs: "OrderedDict[str, Any]",
        stream: Stream,
        total: int,
        devices: list[int],
    ) -> list[Boundary]:
        """Run every segment without gradient, its logged values counted; return the boundary before each."""
        operations = self.operations
        state = stream.state
        boundaries: list[Boundary] = []
        store = BoundaryStore(len(planned))
        for position, segment in enumerate(planned):
            random = RandomState.capture(devices, store, position)
            boundaries.append(Boundary(store.keep_state(state.carried, position), state.rows, random))
            segment_kwargs = OrderedDict(kwargs)
            segment_kwargs["batch"], info = operations.to_device(segment)
            operations.show(info.index, total, False)
            with torch.no_grad(), self.running(info, stream), operations.weighted(info.num_valid):
                operations.step_logged(segment_kwargs)
        return boundaries

    def _recompute(
        self,
        segment: PlannedSegment,
        boundary: Boundary,
        link: Link,
        kwargs: "OrderedDict[str, Any]",
        stream: Stream,
        run_segment: RunSegment,
        decision: Decision | None,
        total: int,
    ) -> tuple[dict[str, Any], Link]:
        """Run one segment again with gradient, from its boundary; return its output and the link to the one before."""
        first = segment.info.index == 0
        leaves = dict(boundary.carried) if first else boundary.leaves()  # no gradient goes back beyond the batch
        boundary.install(stream.state, leaves)
        if boundary.random is not None:
            boundary.random.restore()
        segment_kwargs = OrderedDict(kwargs)
        segment_kwargs["batch"], info = self.operations.to_device(segment)
        info = replace(info, recomputing=True)
        self.operations.show(info.index, total, True)
        called: set[str] = set()

        def join(loss: Tensor) -> Tensor:
            ends = self.carrier.returned_states()
            called.update(ends)
            return link.join(loss, ends)

        with (
            self.running(info, stream),
            self.operations.recomputed(lambda returned: joined_output(returned, join, info.index)),
        ):
            output = run_segment(segment_kwargs, decision, info.num_valid)
        self.segments_run += 1
        if first:
            return output, Link()
        grads = [leaf.grad if leaf.requires_grad else None for leaf in tensors_of(leaves)]
        return output, link.into_previous(leaves, grads, passed=[name for name in leaves if name not in called])

    def probe_bands(
        self,
        plan: SegmentPlan,
        kwargs: "OrderedDict[str, Any]",
        stream: Stream,
        step: Callable[["OrderedDict[str, Any]"], Any],
        span: int,
    ) -> list[ProbedBand]:
        """Run the bands of ``plan`` that start before step ``span`` forward with gradient, keeping their graphs.

        Each band starts from the state the band before it ended with, made a leaf (see
        :mod:`lightning_tbptt.probe`); ``step`` calls ``training_step``. The caller puts the stream's state back
        afterwards.
        """
        bands: list[ProbedBand] = []
        reported = len(self.nonfinite)
        for planned in plan:
            start = planned.info.start
            if start is None or start >= span:
                break
            state = stream.state
            leaves = Boundary(state.carried, state.rows).leaves() if state.carried else {}
            state.carried.update(leaves)
            segment_kwargs = OrderedDict(kwargs)
            segment_kwargs["batch"], info = self.operations.to_device(planned)
            with torch.enable_grad(), self.running(replace(info, probing=True), stream):
                output = step(segment_kwargs)
                ends = self.carrier.returned_states()
            passed = [name for name in leaves if name not in ends]
            bands.append(ProbedBand(start, info.length, loss_of(output), leaves, ends, passed))
        del self.nonfinite[reported:]  # the probe reports nothing: training runs the batch afterwards
        return bands

    def _burn_in(self, planned: PlannedSegment, kwargs: "OrderedDict[str, Any]", stream: Stream) -> None:
        """Run ``training_step`` on a burn-in prefix without gradient or optimizer step: only its state counts."""
        segment_kwargs = OrderedDict(kwargs)
        segment_kwargs["batch"], info = self.operations.to_device(planned)
        with torch.no_grad(), self.running(info, stream), self.operations.silenced():
            self.operations.step_without_gradient(segment_kwargs)

    def evaluate(
        self,
        plan: SegmentPlan,
        step: Callable[..., Any],
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
        stream: Stream,
        adaptation: Adaptation | None = None,
    ) -> Any:
        """Run the segments of an evaluation batch through ``step(segment, *rest, **kwargs)``; join their outputs.

        Burn-in segments run silenced and are not counted; the values each segment logs are weighted by its number of
        valid steps. With an ``adaptation`` (dynamic evaluation), every other segment runs with autograd and, once it
        has returned (scored and logged), adapts the weights on its output; its output is then detached.
        """
        operations = self.operations
        outputs: list[Any] = []
        segments: list[Segment] = []
        for planned in plan:
            segment_batch, info = operations.to_device(planned)
            operations.show(info.index, len(plan), False)
            silenced = operations.silenced() if info.burn_in else nullcontext()
            adapting = adaptation is not None and not info.burn_in
            around = adaptation.context() if adaptation is not None and adapting else nullcontext()
            with around:
                with self.running(info, stream), silenced, operations.weighted(info.num_valid):
                    output = step(segment_batch, *rest, **kwargs)
                if adaptation is not None and adapting:
                    adaptation.update(output, segment_batch)  # a `loss` given to adapt on is computed with autograd
                    output = detached(output)
            outputs.append(output)
            segments.append(info)
        if adaptation is not None and adaptation.then is not None:
            adaptation.then()
        return join_outputs(outputs, segments, batch_size=plan.batch_size, time_length=plan.time_length)

    def take_nonfinite(self) -> list[tuple[Tensor, Tensor | None, Segment]]:
        """The rows reset since the last call (see :attr:`nonfinite`)."""
        taken, self.nonfinite = self.nonfinite, []
        return taken
