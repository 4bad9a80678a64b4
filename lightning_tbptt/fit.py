"""One fit (or evaluation run) of a ``TBPTTCallback``: everything that lives from ``setup`` to ``teardown``.

:class:`Fit` is created by the callback in ``setup`` and released in ``teardown``; the callback's hooks only delegate to
it. It owns the fit's settings (with the resolved segment length), the :class:`~lightning_tbptt.state.StateCarrier`,
the training and evaluation :class:`~lightning_tbptt.streams.Stream`, the
:class:`~lightning_tbptt.schedule.OptimizationSchedule`, the :class:`~lightning_tbptt.runner.SegmentRunner`, the
patches of :mod:`lightning_tbptt._lightning_internals`, and the :class:`~lightning_tbptt.checkpoint.CheckpointRecord`
of where the training epoch stands. Planning a batch, running it through the runner and keeping the record is here;
how segments run is in the runner.
"""

import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_tbptt import compat
from lightning_tbptt._lightning_internals import (
    BatchContext,
    EagerLogging,
    FastDevRunPatch,
    GradientsInEvaluation,
    RankZeroLogging,
    ReleaseOnError,
    RunSegment,
    StepLogging,
    StrategyPatch,
    TrainingLoopPatch,
    batches_started_in_epoch,
    call_training_step,
    complete_batch_saved_at_batch_end,
    resume_reruns_last_batch,
    returned_through,
    show_in_progress_bar,
    silenced_logging,
    weighted_logging,
)
from lightning_tbptt.checkpoint import CheckpointRecord, check_carried
from lightning_tbptt.config import FitFacts, Settings, Transfer, refuse
from lightning_tbptt.distributed import agree_on_probe, agree_on_segment_count, idle_training_step
from lightning_tbptt.dynamic import Adapter, adaptation_loss
from lightning_tbptt.errors import BatchError, ConfigurationError, ModelError
from lightning_tbptt.exact import Boundary, cuda_devices, cudnn_off, frozen_metrics, replayable, replayed
from lightning_tbptt.namespaces import is_overridden, is_param_in_hook_signature
from lightning_tbptt.plan import PlannedSegment, SegmentPlan, plan_custom_segments, plan_segments
from lightning_tbptt.probe import (
    ProbeResult,
    Timer,
    band_length,
    candidate_lengths,
    decay_rate,
    loss_of,
    measure,
    next_length,
    trainable,
)
from lightning_tbptt.progress import SegmentProgress
from lightning_tbptt.random_lengths import scaled_learning_rates
from lightning_tbptt.runner import Adaptation, Operations, SegmentRunner
from lightning_tbptt.schedule import Decision, OptimizationSchedule, StepPer
from lightning_tbptt.segment import Segment, current_segment
from lightning_tbptt.state import StateCarrier, find_recurrent_modules, recurrent_candidates
from lightning_tbptt.streams import EVAL, TRAIN, Stream

if TYPE_CHECKING:
    import pytorch_lightning as pl


def gather_facts(
    settings: Settings,
    trainer: "pl.Trainer",
    module: "pl.LightningModule",
    stage: str,
    *,
    callbacks: int = 1,
    callback: str = "TBPTTCallback",
    callback_splits: bool = False,
) -> FitFacts:
    """What the ``Trainer`` and the module decide about the callback's settings (see :class:`FitFacts`).

    ``callbacks`` is the number of ``TBPTTCallback`` instances in the ``Trainer``, ``callback`` the class name of this
    one, ``callback_splits`` whether its class overrides ``split_batch``.
    """
    segment_length = settings.geometry.segment_length
    facts = FitFacts(
        module=type(module).__name__,
        callbacks=callbacks,
        callback=callback,
        segment_length=segment_length or 0,
        segment_length_from_module=segment_length is None,
    )
    if facts.callbacks > 1 or (stage != "fit" and not settings.evaluate):
        return facts
    facts = replace(
        facts,
        segment_length=segment_length or compat.module_segment_length(module),
        module_splits=compat.splits_batches(module),
        callback_splits=callback_splits,
        automatic=module.automatic_optimization,
    )
    if stage != "fit":
        return facts
    takes, position, expected, signature = compat.hiddens_signature(module)
    return replace(
        facts,
        fetches_batches=is_param_in_hook_signature(module.training_step, "dataloader_iter", explicit=True),
        takes_hiddens=takes,
        hiddens_position=position,
        expected_hiddens_position=expected,
        step_signature=signature,
        strategy=type(trainer.strategy).__name__,
        strategy_accumulates=trainer.strategy.handles_gradient_accumulation,
    )


class Fit:
    """The state of one fit of a ``TBPTTCallback`` (see the module documentation)."""

    def __init__(
        self,
        settings: Settings,
        trainer: "pl.Trainer",
        module: "pl.LightningModule",
        stage: str,
        facts: FitFacts,
        *,
        split_batch: Callable[[Any, int], Sequence[Any]],
        release: Callable[[], None],
    ) -> None:
        self.split_batch = split_batch
        """The callback's ``split_batch`` (used when it is overridden)."""
        self.trainer = trainer
        self.module = module
        self.settings: Settings = settings.for_fit(facts.segment_length)
        self.facts = facts
        self.training = stage == "fit"
        self.takes_hiddens = facts.takes_hiddens
        self.transfer = self._resolve_transfer()
        self.progress = SegmentProgress(trainer)
        self.streams = {TRAIN: Stream(TRAIN), EVAL: Stream(EVAL)}
        self.schedule = OptimizationSchedule()
        self.segment_length = self.settings.geometry.length
        """The segment length in use (``segment_length="auto"`` changes it between batches)."""
        self.batches = 0
        """Training batches this fit has started (the probe's schedule)."""
        self.probe_result: ProbeResult | None = None
        self.drawn: list[int] = []
        """With ``random_lengths``: the lengths drawn for the running (or last) training batch so far."""
        self._draws: Iterator[int] = iter(())
        self.record = CheckpointRecord(streaming=self.settings.streaming, probe=self._probe_record())
        """Where the training epoch stands after the last batch, for checkpoints."""
        self.restored: CheckpointRecord | None = None
        """A record loaded from a checkpoint, until the training starts from it."""
        self.resumed_epoch: int | None = None
        self.resumed_from: CheckpointRecord | None = None
        """The record this fit resumed from (for :meth:`resume_batch`), once training started."""
        self._carrier: StateCarrier | None = None
        self._runner: SegmentRunner | None = None
        self._first_batch_checked = False
        self._modules_checked = False
        self._moving = False
        """Whether the running batch's segments are moved to the device one at a time (see ``_prepare_transfer``)."""
        # removed when the stage raises, even if another callback's `on_exception` raises before ours runs
        self.loop_patch: TrainingLoopPatch | None = None
        patches: list[Any] = [RankZeroLogging(trainer), ReleaseOnError(trainer, release), EagerLogging(module)]
        if self.training:
            patches.append(FastDevRunPatch(trainer))
            step_logging = StepLogging(trainer) if self.settings.log_every == "step" else None
            self.loop_patch = TrainingLoopPatch(trainer, self.run_training_batch, step_logging)
            patches.insert(0, self.loop_patch)
        if self.settings.dynamic_eval is not None:
            patches.append(GradientsInEvaluation(trainer))
        self.adapter: Adapter | None = None
        """The dynamic evaluation of the running evaluation run, or ``None``."""
        self._adapting_stage: str | None = None
        """The evaluation that runs now, when it adapts (``"validate"``, ``"test"``, ``"predict"``), else ``None``."""
        self._adapting_dataloader: int | None = None
        evaluation = self.run_evaluation_batch if self.settings.evaluate else None
        self.strategy_patch = StrategyPatch(trainer, self._keeps_on_host, evaluation)
        self.patches = [*patches, self.strategy_patch]
        for patch in self.patches:
            patch.install()
        self.active = True

    def remove(self) -> None:
        """Remove every patch and hook; safe to call more than once.

        The record and the module stay: a checkpoint saved after the fit holds them.
        """
        self.active = False
        self.end_evaluation()  # the trained weights come back, also when an evaluation raised
        for patch in self.patches:
            patch.remove()
        if self._carrier is not None:
            self._carrier.remove()
            self._carrier = None
        self._runner = None
        self.restored = None

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up
    # ----------------------------------------------------------------------------------------------------------------

    def _resolve_transfer(self) -> Transfer:
        if self.settings.transfer is not None:
            return self.settings.transfer
        datamodule = getattr(self.trainer, "datamodule", None)
        if is_overridden("on_after_batch_transfer", self.module, self.trainer) or (
            datamodule is not None and is_overridden("on_after_batch_transfer", datamodule, self.trainer)
        ):
            return "batch"  # the hook may change the layout: cut what it returns, as without the callback
        return "segment"

    @property
    def runner(self) -> SegmentRunner:
        """The runner of this fit's segments (made, with the carrier, at fit start or the first batch)."""
        if self._runner is None:
            self._runner = SegmentRunner(
                self.carrier,
                Operations(
                    to_device=self._to_device,
                    step_without_gradient=lambda kwargs: call_training_step(self.trainer, kwargs),
                    idle=lambda: idle_training_step(self.trainer.lightning_module, self.trainer.strategy),
                    silenced=lambda: silenced_logging(self.trainer.lightning_module),
                    weighted=lambda weight: weighted_logging(self.trainer, weight),
                    stopped=lambda: 0 <= self.trainer.max_steps <= self.trainer.global_step,
                    show=self.progress.show,
                    step_logged=lambda kwargs: call_training_step(self.trainer, kwargs, logged=True),
                    recomputed=self._recomputed,
                    random_devices=lambda: cuda_devices(self.trainer.lightning_module),
                    replayable=lambda: replayable(self.trainer.lightning_module),
                ),
                time_dim=self.settings.layout.time_dim,
                takes_hiddens=self.takes_hiddens,
            )
        return self._runner

    def _recomputed(self, change: Callable[[Any], Any]) -> AbstractContextManager[None]:
        """While ``exact=True`` recomputes a segment: its ``training_step`` logs nothing and leaves every metric.

        The first pass logged and counted the segment; the hooks around the recomputed step (backward, optimizer step)
        run in this pass only, so they log and update as usual. The step's output passes through ``change``.
        """
        module = self.trainer.lightning_module

        def silenced(output: Callable[[], Any]) -> Any:
            with silenced_logging(module), frozen_metrics(module):
                return output()

        return returned_through(module, change, around=silenced)

    @property
    def carrier(self) -> StateCarrier:
        """The carrier of the recurrent modules' state, made when first needed (all modules exist then)."""
        if self._carrier is None:
            settings = self.settings
            module = self.trainer.lightning_module
            modules = find_recurrent_modules(module, settings.recurrent_modules, settings.exclude_modules)
            if not modules and not self.takes_hiddens:
                excluded = (
                    f" outside `exclude_modules={list(settings.exclude_modules)}`" if settings.exclude_modules else ""
                )
                rank_zero_warn(
                    f"`TBPTTCallback` found no recurrent module{excluded} in {type(module).__name__}, so no state"
                    " is carried between segments. Name custom recurrent modules in"
                    " `TBPTTCallback(recurrent_modules=[...])`."
                )
            trainer = self.trainer
            self._carrier = StateCarrier(
                modules,
                time_dim=settings.layout.time_dim,
                reset_nonfinite=settings.nonfinite_state == "reset",
                # hooks left behind by a fit that failed where no hook of ours ran remove themselves when next called
                alive=lambda: trainer.state.status == "running",
                specs=dict(settings.state_specs),
            )
        return self._carrier

    def zero_lanes(self, lanes: Tensor) -> None:
        """Start the lanes marked in the boolean ``(B,)`` ``lanes`` of the training stream anew (their state zeroed)."""
        state = self.streams[TRAIN].state
        for name, carried in list(state.carried.items()):
            held, _ = state.rows.get(name, (None, 0))
            rows = lanes if held is None else lanes[held]
            state.carried[name] = self.carrier.zero_rows(name, carried, rows.to(torch.bool))

    def reset_stream(self, name: str) -> None:
        """The stream ``name`` starts from zeros."""
        self.streams[name].reset()
        if self._carrier is not None:
            self._carrier.reset()

    # ----------------------------------------------------------------------------------------------------------------
    # Planning and moving segments
    # ----------------------------------------------------------------------------------------------------------------

    def plan(self, batch: Any, stream: str = TRAIN) -> SegmentPlan:
        """Plan the segments of ``batch``: burn-in where the stream starts from zeros; windows overlap in training."""
        settings, facts = self.settings, self.facts
        if facts.splitter is None:
            geometry = settings.geometry
            fresh = not settings.streaming or not self.streams[stream].lanes
            drawn = self._draw() if stream == TRAIN and settings.random_lengths is not None else None
            return plan_segments(
                batch,
                self.segment_length,
                **self._layout(),
                stride=geometry.stride if stream == TRAIN else None,
                burn_in=geometry.burn_in if fresh else 0,
                whole_burn_in=stream != TRAIN,
                loss_on_overlap=geometry.loss_on == "window",
                new_steps=drawn,
            )
        length = self.segment_length
        if facts.module_splits:
            module = self.trainer.lightning_module
            segments = getattr(module, "tbptt_split_batch")(batch, length)  # noqa: B009
            source = f"{type(module).__name__}.tbptt_split_batch"
        else:
            segments = self.split_batch(batch, length)
            source = f"{facts.callback}.split_batch"
        if not isinstance(segments, Sequence) or len(segments) == 0:
            raise BatchError(
                f"Expected `{source}` to return a non-empty sequence of segments but got {segments!r:.80}. Return a"
                " list with one batch per segment, in time order."
            )
        return plan_custom_segments(segments, settings.layout.time_dim, source)

    def _layout(self) -> dict[str, Any]:
        """Where the batches keep time, lengths and reset markers, and whether finished rows are dropped."""
        layout = self.settings.layout
        return {
            "time_dim": layout.time_dim,
            "lengths": layout.lengths,
            "drop_finished": layout.drop_finished,
            "resets": layout.resets,
        }

    def _draw(self) -> Iterator[int]:
        """The lengths of the next training batch's windows, drawn for its epoch and index, kept in :attr:`drawn`."""
        random_lengths = self.settings.random_lengths
        assert random_lengths is not None
        base = self.settings.geometry.stride or self.segment_length
        source = random_lengths.new_steps(base, epoch=self.trainer.current_epoch, batch=self.record.batches_done)
        drawn = self.drawn = []

        def kept() -> Iterator[int]:
            for length in source:
                drawn.append(length)
                yield length

        self._draws = kept()
        return self._draws

    def _scaled(self, run_segment: RunSegment, burn_in_segments: int) -> RunSegment:
        """``run_segment`` with the learning rates scaled by the segment's drawn length over the base length.

        The drawn length, not the length left in the batch, so that every process scales its step alike.
        """
        base = self.settings.geometry.stride or self.segment_length

        def scaled(kwargs: Any, decision: Decision | None, weight: int) -> dict[str, Any]:
            index = current_segment().index - burn_in_segments
            while len(self.drawn) <= index:  # idle steps of a process with fewer segments
                next(self._draws)
            with scaled_learning_rates(self.trainer.optimizers, self.drawn[index] / base):
                return run_segment(kwargs, decision, weight)

        return scaled

    def _keeps_on_host(self) -> bool:
        if self.transfer != "segment":
            return False
        if self.trainer.training:
            return self.loop_patch is not None
        return self.settings.evaluate

    def _prepare_transfer(self, batch: Any) -> None:
        """Decide, once per batch, whether its segments are moved to the device one at a time."""
        self._moving = self._keeps_on_host() and self.strategy_patch.moves(batch)

    def _to_device(self, planned: PlannedSegment) -> tuple[Any, Segment]:
        """Move a segment to the device when batches stay on the host; its info then describes it there."""
        if not self._moving:
            return planned.batch, planned.info
        batch = self.strategy_patch.to_device(planned.batch)
        info = planned.info
        device = self.trainer.strategy.root_device
        if info.device != device:
            lengths = None if info.lengths is None else info.lengths.to(device, non_blocking=True)
            info = replace(info, lengths=lengths, device=device)
        return batch, info

    # ----------------------------------------------------------------------------------------------------------------
    # Running batches
    # ----------------------------------------------------------------------------------------------------------------

    def run_training_batch(self, context: BatchContext, run_segment: RunSegment) -> dict[str, Any]:
        """Run one training batch (called by the patched training loop in place of Lightning's one step)."""
        if "batch" not in context.kwargs:
            raise ModelError(
                "`TBPTTCallback` cannot cut batches that `training_step` fetches itself from a `dataloader_iter`. Take"
                " `training_step(batch, batch_idx)` instead."
            )
        trainer = self.trainer
        stream = self.streams[TRAIN]
        try:
            plan = self.plan(context.kwargs["batch"])
            stream.begin_batch(plan, self.settings.streaming)
        except Exception as error:
            # the other processes are about to wait for this one in the agreement: let them stop too, with the cause
            agree_on_segment_count(trainer, 0, automatic=context.automatic, error=error)
            raise
        self._prepare_transfer(context.kwargs["batch"])
        probe = self.settings.probe
        due = probe is not None and self.batches % probe.every == 0
        self.batches += 1
        if due:
            plan = self._probe(context, plan, stream)
        total = agree_on_segment_count(trainer, plan.steps, automatic=context.automatic)
        self.record.in_batch = True
        step_per: StepPer = "batch" if context.skip_backward else self.settings.step_per
        schedule = self.schedule

        def decide(index: int) -> Decision | None:
            if not context.automatic:
                return None
            return schedule.decide(
                step_per,
                index,
                total,
                accumulate_grad_batches=context.accumulate_grad_batches,
                batch_zeroes=context.batch_zeroes,
                batch_steps=context.batch_steps,
            )

        random_lengths = self.settings.random_lengths
        if random_lengths is not None and random_lengths.scale_lr:
            run_segment = self._scaled(run_segment, plan.burn_in_segments)
        runner = self.runner
        try:
            exact = self.settings.exact and context.automatic and not context.skip_backward
            run = runner.train_exact if exact else runner.train
            ran = run(plan, context.kwargs, stream, run_segment, total=total, decide=decide)
        finally:
            self.progress.done()
        if runner.segments_run and not self._modules_checked:
            self._modules_checked = True
            self._warn_about_new_modules()
        if plan.steps >= 2 and not self._first_batch_checked:
            self._first_batch_checked = True
            self._warn_if_nothing_is_carried()
        self._report_nonfinite(f"training batch {self.record.batches_done} of epoch {trainer.current_epoch}")
        partial = ran.index < total - 1
        self.keep_record(ran.decision is not None and not ran.decision.step, partial=partial)
        return compat.without_hiddens(ran.output) if self.takes_hiddens else ran.output

    def _probe(self, context: BatchContext, plan: SegmentPlan, stream: Stream) -> SegmentPlan:
        """Probe the batch about to train (see :mod:`lightning_tbptt.probe`); return its plan.

        The plan is made again if ``"auto"`` changed the segment length. The model, the stream and the random
        generators are left as they were.
        """
        result: ProbeResult | None = None
        failure: BaseException | None = None
        try:
            result = self._measure(context.kwargs, stream)
        except Exception as error:
            failure = error
        proposal = result.next_length if result is not None and result.next_length is not None else 0
        agreed = agree_on_probe(self.trainer, proposal, error=failure)
        if result is None:
            assert failure is not None
            raise failure
        if self.settings.auto:
            result = replace(result, next_length=agreed)
            if agreed != self.segment_length:
                self.segment_length = agreed
                plan = self.plan(context.kwargs["batch"])
        self.probe_result = result
        trainer = self.trainer
        values = result.metrics()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**values, "epoch": trainer.current_epoch}, step=trainer.global_step)
        show_in_progress_bar(trainer, {name: values[name] for name in _SHOWN if name in values})
        return plan

    def _measure(self, kwargs: Any, stream: Stream) -> ProbeResult:
        """Run the probe on ``kwargs["batch"]``, from the state ``stream`` carries into it."""
        probe = self.settings.probe
        assert probe is not None
        timer = Timer()
        length = self.segment_length
        horizon = probe.span(length)
        lengths = candidate_lengths(probe, length, horizon)
        band = band_length(lengths, length)
        bands_plan = plan_segments(kwargs["batch"], band, **self._layout())
        module = self.trainer.lightning_module
        before = Boundary(stream.state.carried, stream.state.rows)
        buffers = [buffer.detach().clone() for buffer in module.buffers()]
        try:
            with replayed(cuda_devices(module)):
                bands = self.runner.probe_bands(bands_plan, kwargs, stream, self._probe_step, horizon)
                span = bands[-1].start + bands[-1].length
                lengths = [candidate for candidate in lengths if candidate < span]
                biases, decay = measure(bands, trainable(module.parameters()), lengths, type(module).__name__)
                del bands
        finally:
            before.install(stream.state)
            with torch.no_grad():
                for buffer, saved in zip(module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        result = ProbeResult(
            batch=self.batches - 1,
            global_step=self.trainer.global_step,
            segment_length=length,
            span=span,
            band=band,
            tolerance=probe.tolerance,
            biases=biases,
            decay=decay,
            decay_rate=decay_rate(decay),
            seconds=timer.seconds,
        )
        if probe.auto:
            batch_length = bands_plan.time_length or None
            result = replace(result, next_length=next_length(length, result.suggested, probe, batch_length))
        return result

    def _probe_step(self, kwargs: Any) -> Any:
        """``training_step`` for the probe: in the precision plugin's context, logging nothing, metrics unchanged."""
        module = self.trainer.lightning_module
        with (
            self.trainer.strategy.precision_plugin.train_step_context(),
            silenced_logging(module),
            frozen_metrics(module),
        ):
            return module.training_step(*kwargs.values())

    def _probe_record(self) -> dict[str, int] | None:
        if self.settings.probe is None:
            return None
        return {"batches": self.batches, "segment_length": self.segment_length}

    def run_evaluation_batch(
        self, name: str, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run one evaluation batch (called by the patched strategy in place of its ``*_step``)."""
        module_step = getattr(self.trainer.lightning_module, name)
        if not args or is_param_in_hook_signature(module_step, "dataloader_iter", explicit=True):
            raise ModelError(
                f"`TBPTTCallback` cannot cut the batches of `{name}`, which fetches its own batches from a"
                f" `dataloader_iter`. Take `{name}(batch, batch_idx)` instead, or pass `TBPTTCallback(evaluate=False)`."
            )
        batch, rest = args[0], args[1:]
        stream = self.streams[EVAL]
        dataloader = rest[1] if len(rest) > 1 else kwargs.get("dataloader_idx", 0)
        if self.settings.streaming:
            stream.enter_dataloader(dataloader)
        adaptation = self._adaptation(name, rest[0] if rest else 0, dataloader)
        plan = self.plan(batch, EVAL)
        stream.begin_batch(plan, self.settings.streaming)
        self._prepare_transfer(batch)
        try:
            output = self.runner.evaluate(plan, step, rest, kwargs, stream, adaptation)
        finally:
            self.progress.done()
        self._report_nonfinite(f"{name.removesuffix('_step')} batch {rest[0] if rest else '?'}")
        return output

    # ----------------------------------------------------------------------------------------------------------------
    # Dynamic evaluation
    # ----------------------------------------------------------------------------------------------------------------

    def start_evaluation(self, stage: str) -> None:
        """An evaluation run starts: with dynamic evaluation for ``stage``, it adapts from its first batch on."""
        self.end_evaluation()
        settings = self.settings.dynamic_eval
        self._adapting_stage = stage if settings is not None and stage in settings.stages else None

    def end_evaluation(self) -> None:
        """The evaluation run ends (or raised): the trained weights come back, unless they are back already."""
        adapter, self.adapter = self.adapter, None
        self._adapting_stage = None
        if adapter is not None:
            adapter.restore()

    def _adaptation(self, name: str, batch_idx: int, dataloader: int) -> Adaptation | None:
        """The adaptation of an evaluation batch, or ``None`` (no dynamic evaluation in this run).

        The trained weights are kept at the run's first batch rather than when its epoch starts, and put back after
        the last batch of each dataloader (where its length is known) rather than when its epoch ends: other
        callbacks may swap weights in those epoch hooks (e.g. ``EMAWeightAveraging``), in any order with this one.
        """
        settings = self.settings.dynamic_eval
        if settings is None or self._adapting_stage is None:
            return None
        if self.adapter is None:
            module = self.trainer.lightning_module
            adapter = Adapter(settings, list(module.parameters()))
            if settings.rule == "rms":
                self._gradient_statistics(adapter)
            writable_metrics(module)
            self.adapter = adapter
            self._adapting_dataloader = None
        adapter = self.adapter
        if self._adapting_dataloader is not None and dataloader != self._adapting_dataloader:
            adapter.restore()  # each dataloader adapts from the trained weights
        self._adapting_dataloader = dataloader
        last = batch_idx == last_batch(self.trainer, self._adapting_stage, dataloader)

        def update(output: Any, batch: Any) -> None:
            adapter.step(adaptation_loss(settings, output, batch, name))

        return Adaptation(context=lambda: adapting(self.trainer), update=update, then=adapter.restore if last else None)

    def _gradient_statistics(self, adapter: Adapter) -> None:
        """``MS`` for the ``"rms"`` rule: squared gradients of ``training_step``'s loss on training batches."""
        settings = adapter.settings
        source = settings.statistics
        assert source is not None  # checked when made
        module = self.trainer.lightning_module
        with torch.random.fork_rng(devices=cuda_devices(module)):  # a DataLoader draws its seed from torch's generator
            self._accumulate_statistics(adapter, source() if callable(source) else source)

    def _accumulate_statistics(self, adapter: Adapter, batches: Any) -> None:
        settings = adapter.settings
        module = self.trainer.lightning_module
        squared = [torch.zeros_like(p) for p in adapter.parameters]
        count = 0
        stream = Stream("statistics")
        for index, batch in zip(range(settings.statistics_batches), batches, strict=False):
            plan = plan_segments(batch, self.segment_length, **self._layout())
            stream.begin_batch(plan, self.settings.streaming)
            self._prepare_transfer(batch)
            for planned in plan:
                segment, info = self._to_device(planned)
                with adapting(self.trainer), self.runner.running(info, stream):
                    output = self._probe_step(OrderedDict(batch=segment, batch_idx=index))
                loss = loss_of(output)
                if loss is None or not loss.requires_grad:
                    raise ModelError(
                        f"The 'rms' rule of dynamic evaluation takes the gradients of `training_step`'s loss on"
                        f" training batches, but `{type(module).__name__}.training_step` returned {output!r:.80}."
                        " Return the loss (a tensor, or a dict with 'loss')."
                    )
                grads = torch.autograd.grad(loss, adapter.parameters, allow_unused=True)
                for total, grad in zip(squared, grads, strict=True):
                    if grad is not None:
                        total.add_(grad.detach().square())
                count += 1
        self.runner.take_nonfinite()
        adapter.set_statistics(squared, count)

    # ----------------------------------------------------------------------------------------------------------------
    # Warnings after a batch
    # ----------------------------------------------------------------------------------------------------------------

    def _warn_if_nothing_is_carried(self) -> None:
        """After the first batch of several segments: name the modules that always got a state explicitly."""
        names = [] if self.takes_hiddens else self.carrier.given_explicit_state()
        if names:
            rank_zero_warn(
                f"`TBPTTCallback` carried no state into {names}: in every segment of the first batch, the first call"
                " of each was given a state explicitly (e.g. zeros), and a state passed explicitly always wins, so"
                " every segment starts from it. Call them without a state (`self.rnn(x)`; for a cell stepped in a"
                " loop, start the loop from `None`) to have their state carried, name the module that owns the state"
                f" in `recurrent_modules`, or pass `exclude_modules={names}` to silence this warning."
            )

    def _warn_about_new_modules(self) -> None:
        """After the first segment of a fit: name the recurrent modules created since the state carrier was made."""
        if self.takes_hiddens:
            return
        settings = self.settings
        found = recurrent_candidates(
            self.trainer.lightning_module, settings.recurrent_modules, settings.exclude_modules
        )
        new = sorted(set(found) - set(self.carrier.modules))
        if new:
            rank_zero_warn(
                f"`TBPTTCallback` does not carry the state of {new}: they did not exist when the fit started (they"
                " were created in `on_train_start` or in a step), so no hook was added to them and every segment"
                " starts them from zeros. Create recurrent modules in `__init__` or `configure_model`, or pass"
                f" `exclude_modules={new}` to silence this warning."
            )

    def _report_nonfinite(self, where: str) -> None:
        """Warn about the rows whose non-finite state was reset in this batch (one host synchronisation)."""
        entries = self.runner.take_nonfinite()
        if not entries:
            return
        flagged = torch.stack([bad.any() for bad, _, _ in entries]).tolist()
        trainer = self.trainer
        process = f"process {trainer.global_rank}: " if trainer.world_size > 1 else ""
        for (bad, rows, info), any_bad in zip(entries, flagged, strict=True):
            if not any_bad:
                continue
            found = torch.nonzero(bad).flatten().cpu()
            lanes = (found if rows is None else rows[found]).tolist()
            steps = f"steps [{info.start}, {info.stop})" if info.start is not None else f"segment {info.index}"
            warnings.warn(
                f"{process}Reset the carried state of rows {lanes} of {where} after its {steps}: it held NaN or"
                " infinite values (`TBPTTCallback(nonfinite_state='reset')`). Those rows start the next segment from"
                " zeros, as at the start of a new sequence.",
                UserWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Where the epoch stands: the checkpoint record
    # ----------------------------------------------------------------------------------------------------------------

    def start_epoch(self) -> None:
        """A training epoch starts (not one resumed in the middle): from zeros, with a fresh accumulation."""
        resumed, self.resumed_epoch = self.resumed_epoch, None
        if resumed == self.trainer.current_epoch:
            return
        self.schedule.reset()
        self.reset_stream(TRAIN)
        self.record = CheckpointRecord(
            epoch=self.trainer.current_epoch, streaming=self.settings.streaming, probe=self._probe_record()
        )

    def keep_record(self, pending: bool, *, partial: bool = False, batches_done: int | None = None) -> None:
        """After a training batch (or on resume): what a checkpoint taken now must hold to resume exactly."""
        trainer = self.trainer
        stream = self.streams[TRAIN]
        done = self.record.batches_done + 1 if batches_done is None else batches_done
        self.record = CheckpointRecord(
            epoch=trainer.current_epoch,
            batches_done=done,
            mid_epoch=0 < done < trainer.num_training_batches,
            accumulated=self.schedule.accumulated,
            partial=partial,
            streaming=self.settings.streaming,
            world_size=trainer.world_size,
            pending_gradients=pending,
            lanes=stream.lanes,
            carried=dict(stream.state.carried),
            unfinished=stream.unfinished,
            probe=self._probe_record(),
        )

    def state_dict(self) -> dict[str, Any]:
        """The callback's checkpoint entry: the record, with the gradients pending and the states gathered."""
        record = replace(self.record, config=self.settings.saved())
        # Every process holds its own lanes (and, between the synchronised steps, its own gradients): with several
        # processes these are gathered, each tensor gaining a leading dimension indexed by rank. Lightning builds a
        # checkpoint on every rank at the same point, so all of them reach the collective. Nothing is gathered after
        # a failure (the other processes may not be saving, and a collective would wait for them forever) or inside
        # a batch; such a checkpoint cannot resume several processes.
        gather = self.active and record.world_size > 1 and not self.trainer.interrupted and not record.in_batch
        record.gathered = gather
        if record.pending_gradients and not record.in_batch:
            # read now rather than copied after every batch: between batches only Lightning's release before
            # validation changes them, and a checkpoint must then hold what is left
            parameters = list(self.module.named_parameters())
            if gather:
                # every process gathers every parameter, in one order: a parameter without a gradient on some
                # process is sent as zeros, flagged as absent
                present = [p.grad is not None for _, p in parameters]
                record.gradients = self._gathered(
                    {name: p.grad.detach() if p.grad is not None else torch.zeros_like(p) for name, p in parameters}
                )
                flags = torch.tensor(present, dtype=torch.uint8, device=parameters[0][1].device)
                record.gradients_present = self._gathered(flags)  # (processes, parameters), in the order above
            else:
                record.gradients = {name: p.grad.detach().clone() for name, p in parameters if p.grad is not None}
        if record.streaming:
            unfinished = None if record.unfinished is None else record.unfinished.to(torch.uint8)
            record.carried = self._gathered(record.carried) if gather else record.carried
            record.unfinished = self._gathered(unfinished) if gather else unfinished
        return record.to_dict()

    def _gathered(self, value: Any) -> Any:
        strategy = self.trainer.strategy
        return apply_to_collection(value, Tensor, lambda t: strategy.all_gather(t).cpu())

    # ----------------------------------------------------------------------------------------------------------------
    # Resuming
    # ----------------------------------------------------------------------------------------------------------------

    def resume_batch(self) -> int:
        """See :attr:`TBPTTCallback.resume_batch`: from the checkpoint's record, loaded or being resumed."""
        restored = self.restored if self.restored is not None else self.resumed_from
        if restored is None or restored.epoch != self.trainer.current_epoch:
            return 0  # Lightning counts the checkpoint's epoch as finished (e.g. after stopping at `max_steps`)
        if restored.mid_epoch:
            return restored.batches_done
        # At the end of an epoch, Lightning before 2.5 runs the epoch's last index once more: give it no data.
        return restored.batches_done if resume_reruns_last_batch(self.trainer) else 0

    def start_training(self) -> None:
        """After the checkpoint is restored and before the first batch: resume from its record, or check it."""
        trainer = self.trainer
        restored, self.restored = self.restored, None
        self.resumed_from = restored  # the loader is iterated after this hook: `resume_batch` still reads it
        self.resumed_epoch = None
        if restored is None:
            if trainer.ckpt_path is not None:
                self._check_resume_without_state()
            return
        settings = self.settings
        if restored.config is not None:
            self._warn_about_changed_settings(restored.config)
        if restored.probe is not None and settings.probe is not None:
            self.batches = restored.probe["batches"]
            if settings.auto:
                self.segment_length = restored.probe["segment_length"]
        if restored.streaming != settings.streaming:
            raise ConfigurationError(
                f"Expected the checkpoint to come from a fit with `TBPTTCallback(streaming={settings.streaming})` but"
                f" it was saved with `streaming={restored.streaming}`. Resume with the same setting."
            )
        if restored.in_batch:
            rank_zero_warn(
                f"The checkpoint being resumed was saved while batch {restored.batches_done} of epoch"
                f" {restored.epoch} was running (e.g. on an exception or a signal): its parameters may include"
                " some of that batch's segments, which are trained again from the batch's start, and gradients"
                " accumulated before it are not saved. For exact resumption, resume from a checkpoint saved between"
                " batches (e.g. by `ModelCheckpoint`)."
            )
        if resume_reruns_last_batch(trainer):
            complete_batch_saved_at_batch_end(trainer)
        if restored.mid_epoch and restored.epoch == trainer.current_epoch:
            self._resume(restored)
            self.resumed_epoch = trainer.current_epoch

    def _check_resume_without_state(self) -> None:
        """A checkpoint that holds no state of this callback: refuse what cannot resume exactly, else warn."""
        trainer = self.trainer
        started = batches_started_in_epoch(trainer)
        if not 0 < started < trainer.num_training_batches:
            return  # resumes at an epoch boundary: nothing is carried across it
        if self.settings.streaming:
            raise ConfigurationError(
                f"Expected the checkpoint {trainer.ckpt_path} to hold the state of `TBPTTCallback` (the carried state"
                f" of every lane), since it was saved in the middle of an epoch ({started} batches done) and"
                " `streaming=True`, but it holds none: it was saved without the callback, or the entry was removed."
                " Resume from a checkpoint saved with the callback, or from one saved at the end of an epoch."
            )
        if trainer.accumulate_grad_batches > 1 or self.settings.step_per == "batch":
            rank_zero_warn(
                f"The checkpoint {trainer.ckpt_path} holds no state of `TBPTTCallback` (it was saved without the"
                f" callback, or the entry was removed) and was saved in the middle of an epoch ({started} batches"
                " done): the accumulated gradients and the count of segments towards the next optimizer step are"
                " unknown, so training resumes from a fresh accumulation. Resume from a checkpoint saved with the"
                " callback for an exact continuation."
            )

    def _warn_about_changed_settings(self, saved: dict[str, Any]) -> None:
        current = self.settings.saved()
        changed = {key: value for key, value in current.items() if key in saved and saved[key] != value}
        if changed:
            before = ", ".join(f"{key}={saved[key]!r}" for key in changed)
            now = ", ".join(f"{key}={value!r}" for key, value in changed.items())
            rank_zero_warn(
                f"The checkpoint being resumed was trained with `TBPTTCallback({before})` and this fit uses `{now}`:"
                " training goes on with the new settings (the carried state and the data position are kept), so the"
                " result is not that of one uninterrupted run. That is fine for fine-tuning; for an exact resume,"
                " use the settings the checkpoint was saved with."
            )

    def _resume(self, restored: CheckpointRecord) -> None:
        """Continue the epoch of a checkpoint saved mid-epoch: its position, accumulation and carried state."""
        trainer = self.trainer
        if restored.partial:
            rank_zero_warn(
                f"The checkpoint being resumed was saved after `max_steps` stopped batch {restored.batches_done - 1}"
                " of its epoch before its last segment; training continues with the next batch, so the rest of that"
                " batch is never trained and the result differs from one longer run. For exact resumption, choose"
                " `max_steps` as a multiple of the optimizer steps per batch."
            )
        saved_world = restored.world_size
        needs_processes = self.settings.streaming or restored.gradients is not None
        if needs_processes and saved_world > 1 and not restored.gathered:
            raise ConfigurationError(
                f"Expected the checkpoint to hold the lanes (or accumulated gradients) of its {saved_world} processes"
                " but it was saved outside a point where they could be gathered (e.g. on an exception), with one"
                " process's only. Resume from a checkpoint saved by `ModelCheckpoint`, or from one saved at the end"
                " of an epoch."
            )
        if needs_processes and saved_world != trainer.world_size:
            raise ConfigurationError(
                f"Expected to resume with the {saved_world} processes the checkpoint was saved with, whose lanes (or"
                f" accumulated gradients) it holds, but got `Trainer.world_size={trainer.world_size}`. Resume with"
                f" {saved_world} processes, or from a checkpoint saved at the end of an epoch."
            )
        own = restored.for_process(trainer.global_rank)
        self.schedule.accumulated = own.accumulated
        if own.gradients is not None:
            for name, parameter in trainer.lightning_module.named_parameters():
                saved = own.gradients.get(name)
                parameter.grad = None if saved is None else saved.to(parameter.device)
        self.reset_stream(TRAIN)
        if self.settings.streaming:
            self._restore_stream(own)
        # a checkpoint taken before the first resumed batch ends must hold all of this again (the epoch resumed is the
        # checkpoint's: `start_training` resumes only then)
        self.keep_record(own.gradients is not None, batches_done=own.batches_done)

    def _restore_stream(self, restored: CheckpointRecord) -> None:
        carried = restored.carried
        carrier = self.carrier
        missing = sorted(set(carried) - set(carrier.modules))
        if missing:
            raise ConfigurationError(
                f"Expected the checkpoint's carried state to belong to this model's recurrent modules"
                f" {sorted(carrier.modules)} but it holds the state of {missing}. Resume with the model (and"
                " `recurrent_modules`/`exclude_modules`) the checkpoint was saved with."
            )
        check_carried(carried, carrier.modules)
        device = self.trainer.strategy.root_device
        on_device = apply_to_collection(carried, Tensor, lambda t: t.to(device))
        self.streams[TRAIN].restore(on_device, restored.lanes, restored.unfinished)


_SHOWN = ("tbptt/probe_bias", "tbptt/segment_length")
"""The probe's values shown in the progress bar."""


def refuse_for(settings: Settings, facts: FitFacts, stage: str) -> None:
    """The refusals of a fit's set-up (and, for ``fit``, of training)."""
    fit_settings = settings.for_fit(facts.segment_length) if facts.segment_length else settings
    refuse("setup", fit_settings, facts)
    if stage == "fit":
        refuse("training", fit_settings, facts)


@contextmanager
def adapting(trainer: "pl.Trainer") -> Iterator[None]:
    """While active, an evaluation step can be backpropagated.

    Autograd on, DDP's gradient synchronisation off for its forward (each process adapts on its own lanes), and cuDNN
    off on CUDA (it refuses an RNN's backward in eval mode).
    """
    model = trainer.strategy.model
    no_sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) else nullcontext()
    cuda = trainer.strategy.root_device.type == "cuda"
    cudnn = cudnn_off() if cuda else nullcontext()
    with torch.inference_mode(False), torch.enable_grad(), no_sync, cudnn:
        yield


def last_batch(trainer: "pl.Trainer", stage: str, dataloader: int) -> int | None:
    """The index of the last batch the running evaluation takes from ``dataloader``, or ``None`` if not known."""
    if trainer.sanity_checking:
        counts: Any = trainer.num_sanity_val_batches
    else:
        counts = {"validate": trainer.num_val_batches, "test": trainer.num_test_batches}.get(stage)
        counts = trainer.num_predict_batches if counts is None else counts
    try:
        count = counts[dataloader]
    except (IndexError, TypeError):
        return None
    return int(count) - 1 if isinstance(count, int) or (isinstance(count, float) and count.is_integer()) else None


def writable_metrics(module: torch.nn.Module) -> None:
    """Make the states of ``module``'s ``torchmetrics`` metrics that an inference-mode run left writable outside it.

    A tensor made under ``torch.inference_mode()`` (a metric's state reset by an earlier evaluation run in that mode)
    cannot be updated in place outside it; dynamic evaluation runs its steps outside it.
    """
    from torchmetrics import Metric

    with torch.inference_mode(False):
        for metric in module.modules():
            if isinstance(metric, Metric):
                for name in getattr(metric, "_defaults", {}):
                    value = getattr(metric, name)
                    if isinstance(value, Tensor) and value.is_inference():
                        setattr(metric, name, value.clone())
                    elif isinstance(value, list) and any(isinstance(v, Tensor) and v.is_inference() for v in value):
                        setattr(metric, name, [v.clone() if isinstance(v, Tensor) else v for v in value])
