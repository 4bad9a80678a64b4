"""``TBPTTCallback``: train an unmodified ``LightningModule`` on long sequences, segment by segment."""

import inspect
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from typing_extensions import override

from lightning_tbptt._lightning_internals import BatchContext, RunSegment, TrainingLoopPatch
from lightning_tbptt.errors import BatchError, ConfigurationError, ModelError
from lightning_tbptt.lengths import LengthsLocation, LengthsSpec
from lightning_tbptt.plan import SegmentPlan, plan_custom_segments, plan_segments
from lightning_tbptt.schedule import STEP_PER_CHOICES, OptimizationSchedule, StepPer
from lightning_tbptt.segment import running
from lightning_tbptt.split import split_batch
from lightning_tbptt.state import StateCarrier, detach_state, find_recurrent_modules


def _check_positive_int(value: Any, argument: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"Expected argument `{argument}` to be a positive integer but got {value!r}. Pass the number of time"
            f" steps per segment, e.g. `{example}`."
        )
    return value


def _check_names(value: Any, argument: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return tuple(value)
    raise ConfigurationError(
        f"Expected argument `{argument}` to be a list of submodule names but got {value!r}. Pass e.g."
        f" `{argument}=['encoder.cell']`."
    )


class TBPTTCallback(Callback):
    """Truncated backpropagation through time for an unmodified ``LightningModule``.

    Each training batch is cut along time into segments of ``segment_length`` steps (the last may be shorter).
    ``training_step`` runs once per segment, through Lightning's own automatic optimization, so gradient clipping,
    precision plugins, ``optimizer_step`` overrides, backward and optimizer hooks and LR schedulers keep working.
    The state of every ``torch.nn`` recurrent module (``LSTM``, ``GRU``, ``RNN``) called without a state is carried
    from one segment to the next, detached; the first segment of each batch starts from zeros.

    Args:
        segment_length: Time steps per segment. ``None`` takes the module's ``truncated_bptt_steps`` attribute
            (Lightning 1.x style).
        time_dim: The time dimension of sequence tensors: 1 for batch-first ``(B, T, ...)``, 0 for ``(T, B, ...)``.
            Which tensors count as sequences is documented in :mod:`lightning_tbptt.split`.
        step_per: ``"segment"`` (default): an optimizer step after every segment (classic TBPTT).
            ``"batch"``: the gradients of all segments of a batch are accumulated into one step per batch.
            ``Trainer(accumulate_grad_batches=N)`` then counts segments or batches respectively
            (see :mod:`lightning_tbptt.schedule`).
        recurrent_modules: Names (as in ``model.named_modules()``) of custom recurrent modules whose state is
            carried too; they must follow ``forward(input, state=None) -> (output, new_state)``.
        exclude_modules: Names of modules whose state must not be carried (they start from zeros in every segment).
        lengths: Where batches carry the lengths of their padded sequences: a key, an index, a path of those, or a
            callable (see :mod:`lightning_tbptt.lengths`). Segments then carry their own lengths in that place,
            segments in which every sequence has ended are not run, and :func:`~lightning_tbptt.current_segment`'s
            mask marks padding as invalid. ``None``: every time step is valid.
        drop_finished: With ``lengths``, drop the rows whose sequence has ended from the later segments of a batch
            (and from the carried state), so that the work follows the number of valid steps and no row of a segment
            has length 0. The model must then accept a batch size that shrinks from one segment to the next, and its
            loss must not count padding (e.g. :func:`~lightning_tbptt.masked_mean`).

    Raises:
        ConfigurationError: If an argument is invalid.

    Example:
        >>> TBPTTCallback(segment_length=64)
        TBPTTCallback(segment_length=64, time_dim=1, step_per='segment')
        >>> TBPTTCallback(segment_length=64, step_per="sequence")
        Traceback (most recent call last):
          ...
        lightning_tbptt.errors.ConfigurationError: Expected argument `step_per` to be one of ('segment', 'batch') but got 'sequence'. Use 'segment' for a step after every segment or 'batch' for one step per batch.

    """  # noqa: E501

    def __init__(
        self,
        segment_length: int | None = None,
        *,
        time_dim: int = 1,
        step_per: StepPer = "segment",
        recurrent_modules: Sequence[str] = (),
        exclude_modules: Sequence[str] = (),
        lengths: LengthsSpec | None = None,
        drop_finished: bool = False,
    ) -> None:
        if segment_length is not None:
            _check_positive_int(segment_length, "segment_length", "TBPTTCallback(segment_length=64)")
        if isinstance(time_dim, bool) or not isinstance(time_dim, int) or time_dim < 0:
            raise ConfigurationError(
                f"Expected argument `time_dim` to be a non-negative integer but got {time_dim!r}. Pass 1 for"
                " batch-first sequences `(B, T, ...)` or 0 for time-first sequences `(T, B, ...)`."
            )
        if step_per not in STEP_PER_CHOICES:
            raise ConfigurationError(
                f"Expected argument `step_per` to be one of {STEP_PER_CHOICES} but got {step_per!r}. Use 'segment'"
                " for a step after every segment or 'batch' for one step per batch."
            )
        self.segment_length = segment_length
        self.time_dim = time_dim
        self.step_per: StepPer = step_per
        self.recurrent_modules = _check_names(recurrent_modules, "recurrent_modules")
        self.exclude_modules = _check_names(exclude_modules, "exclude_modules")
        if not isinstance(drop_finished, bool):
            raise ConfigurationError(
                f"Expected argument `drop_finished` to be a bool but got {drop_finished!r}. Pass True or False."
            )
        if drop_finished and lengths is None:
            raise ConfigurationError(
                "Expected argument `lengths` to be set with `drop_finished=True` but got None: rows can only be"
                " dropped once their sequence is known to have ended. Pass e.g. `lengths='lengths'`."
            )
        self.lengths = lengths
        self.drop_finished = drop_finished
        self._lengths = None if lengths is None else LengthsLocation(lengths)
        self._fit_segment_length = 0
        self._takes_hiddens = False
        self._split_with_module = False
        self._custom_split = False
        self._schedule: OptimizationSchedule | None = None
        self._carrier: StateCarrier | None = None
        self._patch: TrainingLoopPatch | None = None
        self._trainer: pl.Trainer | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(segment_length={self.segment_length}, time_dim={self.time_dim},"
            f" step_per={self.step_per!r})"
        )

    def split_batch(self, batch: Any, segment_length: int) -> Sequence[Any]:
        """Cut one training batch into the segments passed, in order, to ``training_step``.

        Override this method to take over splitting. The default cuts every sequence tensor into views of
        ``segment_length`` steps along ``time_dim`` (see :mod:`lightning_tbptt.split`). A ``LightningModule`` that
        defines Lightning 1.x's ``tbptt_split_batch(batch, split_size)`` is honoured instead of this method,
        unless this method is overridden too.

        Args:
            batch: The batch as Lightning passes it to ``training_step`` (already on the device).
            segment_length: The segment length of this fit.

        Returns:
            The segments, in time order.

        """
        return split_batch(batch, segment_length, self.time_dim)

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # The loop is patched here rather than in `on_fit_start`: tuner callbacks (`LearningRateFinder`,
        # `BatchSizeFinder`) run their trial fits in their own `on_fit_start`, which Lightning calls before ours.
        if stage != "fit":
            return
        self._teardown()
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        count = sum(isinstance(callback, TBPTTCallback) for callback in callbacks)
        if count > 1:
            raise ConfigurationError(
                f"Expected one `TBPTTCallback` in `Trainer(callbacks=...)` but got {count}. Keep a single instance"
                " with the segment length and options you want."
            )
        self._fit_segment_length = self._resolve_segment_length(pl_module)
        self._check_module(pl_module)
        if self.step_per == "batch" and trainer.strategy.handles_gradient_accumulation:
            raise ConfigurationError(
                f"`TBPTTCallback(step_per='batch')` cannot work with the strategy {type(trainer.strategy).__name__}:"
                " it accumulates gradients itself and steps after every segment. Use `step_per='segment'` or"
                " another strategy."
            )
        self._schedule = OptimizationSchedule()
        self._trainer = trainer
        self._patch = TrainingLoopPatch(trainer, self._run_batch)
        self._patch.install()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._ensure_carrier()

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._schedule is not None:
            self._schedule.reset()

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._teardown()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._teardown()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._teardown()

    # ----------------------------------------------------------------------------------------------------------------
    # Checks at fit start
    # ----------------------------------------------------------------------------------------------------------------

    def _resolve_segment_length(self, pl_module: "pl.LightningModule") -> int:
        if self.segment_length is not None:
            return self.segment_length
        steps = getattr(pl_module, "truncated_bptt_steps", None)
        if steps is None:
            raise ConfigurationError(
                f"Expected argument `segment_length` of `TBPTTCallback` or the attribute `truncated_bptt_steps` of"
                f" {type(pl_module).__name__} to be set but got neither. Pass e.g."
                " `TBPTTCallback(segment_length=64)`."
            )
        return _check_positive_int(steps, "truncated_bptt_steps", "self.truncated_bptt_steps = 64")

    def _check_module(self, pl_module: "pl.LightningModule") -> None:
        step = pl_module.training_step
        if is_param_in_hook_signature(step, "dataloader_iter", explicit=True):
            raise ModelError(
                f"`{type(pl_module).__name__}.training_step(dataloader_iter)` fetches its own batches, so"
                " `TBPTTCallback` cannot cut them into segments. Take `training_step(batch, batch_idx)` instead."
            )
        parameters = list(inspect.signature(step).parameters)
        self._takes_hiddens = "hiddens" in parameters
        if self._takes_hiddens:
            expected = 2 if is_param_in_hook_signature(step, "batch_idx", min_args=2) else 1
            if parameters.index("hiddens") != expected:
                raise ModelError(
                    f"Expected `{type(pl_module).__name__}.training_step` to take `hiddens` as its argument after"
                    f" `batch` and `batch_idx` but got `training_step{inspect.signature(step)}`. Use"
                    " `training_step(self, batch, batch_idx, hiddens)`."
                )
        module_splits = callable(getattr(pl_module, "tbptt_split_batch", None))
        callback_splits = type(self).split_batch is not TBPTTCallback.split_batch
        if module_splits and callback_splits:
            raise ConfigurationError(
                f"Both `{type(self).__name__}.split_batch` and `{type(pl_module).__name__}.tbptt_split_batch` are"
                " defined, so it is unclear which one cuts the batches. Keep only one of them."
            )
        self._split_with_module = module_splits
        self._custom_split = module_splits or callback_splits
        if self.lengths is not None and self._custom_split:
            splitter = "tbptt_split_batch" if module_splits else "split_batch"
            raise ConfigurationError(
                f"`TBPTTCallback(lengths={self.lengths!r})` cannot be combined with a custom `{splitter}`: the start of"
                " its segments in the batch is unknown, so their lengths are too. Drop one of the two."
            )
        if self.drop_finished and self._takes_hiddens:
            raise ConfigurationError(
                "`TBPTTCallback(drop_finished=True)` cannot drop finished rows from `hiddens`, whose layout it does not"
                " know. Use `drop_finished=False`, or let the callback carry the RNN state (no `hiddens` argument)."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Running one batch
    # ----------------------------------------------------------------------------------------------------------------

    def _plan(self, batch: Any) -> SegmentPlan:
        if not self._custom_split:
            return plan_segments(
                batch,
                self._fit_segment_length,
                time_dim=self.time_dim,
                lengths=self._lengths,
                drop_finished=self.drop_finished,
            )
        assert self._trainer is not None
        if self._split_with_module:
            module = self._trainer.lightning_module
            segments = getattr(module, "tbptt_split_batch")(batch, self._fit_segment_length)  # noqa: B009
            source = f"{type(module).__name__}.tbptt_split_batch"
        else:
            segments = self.split_batch(batch, self._fit_segment_length)
            source = f"{type(self).__name__}.split_batch"
        if not isinstance(segments, Sequence) or len(segments) == 0:
            raise BatchError(
                f"Expected `{source}` to return a non-empty sequence of segments but got {segments!r:.80}. Return a"
                " list with one batch per segment, in time order."
            )
        return plan_custom_segments(segments, self.time_dim, source)

    def _ensure_carrier(self) -> StateCarrier:
        """Hook the recurrent modules once they all exist (after `configure_model`), at fit start or first batch."""
        if self._carrier is None:
            assert self._trainer is not None
            pl_module = self._trainer.lightning_module
            modules = find_recurrent_modules(pl_module, self.recurrent_modules, self.exclude_modules)
            if not modules and not self._takes_hiddens:
                excluded = f" outside `exclude_modules={list(self.exclude_modules)}`" if self.exclude_modules else ""
                rank_zero_warn(
                    f"`TBPTTCallback` found no recurrent module{excluded} in {type(pl_module).__name__}, so no state"
                    " is carried between segments. Name custom recurrent modules in"
                    " `TBPTTCallback(recurrent_modules=[...])`."
                )
            self._carrier = StateCarrier(modules)
        return self._carrier

    def _run_batch(self, context: BatchContext, run_segment: RunSegment) -> dict[str, Any]:
        assert self._trainer is not None
        assert self._schedule is not None
        if "batch" not in context.kwargs:
            raise ModelError(
                "`TBPTTCallback` cannot cut batches that `training_step` fetches itself from a `dataloader_iter`. Take"
                " `training_step(batch, batch_idx)` instead."
            )
        trainer = self._trainer
        plan = self._plan(context.kwargs["batch"])
        carrier = self._ensure_carrier()
        carrier.reset()
        step_per: StepPer = "batch" if context.skip_backward else self.step_per
        hiddens = None
        output: dict[str, Any] = {}
        for planned in plan:
            index = planned.info.index
            kwargs = OrderedDict(context.kwargs)
            kwargs["batch"] = planned.batch
            if self._takes_hiddens:
                kwargs["hiddens"] = hiddens
            decision = None
            if context.automatic:
                decision = self._schedule.decide(
                    step_per,
                    index,
                    len(plan),
                    accumulate_grad_batches=context.accumulate_grad_batches,
                    batch_zeroes=context.batch_zeroes,
                    batch_steps=context.batch_steps,
                )
            with carrier.segment(planned.info.rows, planned.info.batch_size), running(planned.info):
                output = run_segment(kwargs, decision, planned.info.num_valid)
            if self._takes_hiddens:
                hiddens = self._returned_hiddens(output, index)
            if 0 <= trainer.max_steps <= trainer.global_step:
                break
        return output

    def _returned_hiddens(self, output: dict[str, Any], index: int) -> Any:
        if "hiddens" not in output:
            raise ModelError(
                f"Expected `training_step(batch, batch_idx, hiddens)` to return a dict with the key 'hiddens' but"
                f" segment {index} returned {f'the keys {sorted(output)}' if output else 'nothing'}, so the state"
                " of the next segment is unknown. Return `{'loss': loss, 'hiddens': new_hiddens}`."
            )
        output["hiddens"] = detach_state(output["hiddens"])
        return output["hiddens"]

    def _teardown(self) -> None:
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
        if self._carrier is not None:
            self._carrier.remove()
            self._carrier = None
        self._schedule = None
        self._trainer = None
