"""``TBPTTCallback``: train an unmodified ``LightningModule`` on long sequences, segment by segment."""

import dataclasses
import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from lightning_utilities.core.rank_zero import rank_zero_warn
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from typing_extensions import override

from lightning_tbptt._lightning_internals import (
    BatchContext,
    EagerLogging,
    FastDevRunPatch,
    ReleaseOnError,
    RunSegment,
    StepLogging,
    StrategyPatch,
    TrainingLoopPatch,
    batches_started_in_epoch,
    call_training_step,
    complete_batch_saved_at_batch_end,
    resume_reruns_last_batch,
    set_log_weight,
)
from lightning_tbptt.checkpoint import check_carried, check_entry
from lightning_tbptt.distributed import agree_on_segment_count, idle_training_step
from lightning_tbptt.errors import BatchError, ConfigurationError, ModelError
from lightning_tbptt.lengths import LengthsLocation, LengthsSpec
from lightning_tbptt.namespaces import CallbackBase, follow_trainer_logging, is_overridden
from lightning_tbptt.outputs import join_outputs
from lightning_tbptt.plan import PlannedSegment, SegmentPlan, plan_custom_segments, plan_segments
from lightning_tbptt.progress import SegmentProgress
from lightning_tbptt.schedule import STEP_PER_CHOICES, Decision, OptimizationSchedule, StepPer
from lightning_tbptt.segment import Segment, running
from lightning_tbptt.split import split_batch
from lightning_tbptt.state import StateCarrier, detach_state, find_recurrent_modules, recurrent_candidates


def _check_positive_int(value: Any, argument: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"Expected argument `{argument}` to be a positive integer but got {value!r}. Pass the number of time"
            f" steps per segment, e.g. `{example}`."
        )
    return value


Transfer = Literal["segment", "batch"]
TRANSFER_CHOICES: tuple[Transfer, ...] = ("segment", "batch")
LossOn = Literal["new", "window"]
LOSS_ON_CHOICES: tuple[LossOn, ...] = ("new", "window")
LogEvery = Literal["step", "batch"]
LOG_EVERY_CHOICES: tuple[LogEvery, ...] = ("step", "batch")
NonfiniteState = Literal["keep", "reset"]
NONFINITE_STATE_CHOICES: tuple[NonfiniteState, ...] = ("keep", "reset")
CHECKPOINT_FORMAT = 1
"""The version of the callback's entry in checkpoints; an entry of a newer version is refused."""
_TRAIN = "train"
_EVAL = "eval"


@dataclasses.dataclass
class _Position:
    """Where the training epoch stands after a batch, and the training stream's state then (for checkpoints)."""

    epoch: int = 0
    batches_done: int = 0
    num_batches: float = 0
    accumulated: int = 0
    partial: bool = False
    pending_gradients: bool = False
    """Whether the parameters' gradients are accumulated towards an optimizer step that has not happened yet."""
    lanes: int | None = None
    carried: dict[str, Any] = dataclasses.field(default_factory=dict)
    unfinished: Tensor | None = None
    world_size: int = 1
    in_batch: bool = False
    """Set while a batch runs: a checkpoint taken then holds parameters from the middle of the batch."""


@contextmanager
def _not_logging(module: Any) -> Iterator[None]:
    """Make ``self.log``/``self.log_dict`` of ``module`` do nothing, while a burn-in segment runs.

    Its values (a loss over no valid step may be NaN) must reach no log, whatever their weight or reduction.
    """
    shadowed = vars(module)
    previous = {name: shadowed.get(name) for name in ("log", "log_dict")}

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    shadowed.update(log=ignore, log_dict=ignore)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del shadowed[name]
            else:
                shadowed[name] = value


def _check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected argument `{argument}` to be a bool but got {value!r}. Pass True or False.")
    return value


def _check_names(value: Any, argument: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return tuple(value)
    raise ConfigurationError(
        f"Expected argument `{argument}` to be a list of submodule names but got {value!r}. Pass e.g."
        f" `{argument}=['encoder.cell']`."
    )


class TBPTTCallback(CallbackBase):
    """Truncated backpropagation through time for an unmodified ``LightningModule``.

    Each training batch is cut along time into segments of ``segment_length`` steps (the last may be shorter).
    ``training_step`` runs once per segment, through Lightning's own automatic optimization, so gradient clipping,
    precision plugins, ``optimizer_step`` overrides, backward and optimizer hooks and LR schedulers keep working.
    The state of every ``torch.nn`` recurrent module (``LSTM``, ``GRU``, ``RNN``) called without a state is carried
    from one segment to the next, detached; the first segment of each batch starts from zeros (unless ``streaming``).
    Validation, test and prediction batches are cut the same way (unless ``evaluate=False``), and only the running
    segment is moved to the device (unless ``transfer="batch"``).

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
        streaming: Carry the state across batches too: row ``j`` of a batch continues row ``j`` of the previous batch
            (a *lane*), as in the batches of :class:`~lightning_tbptt.data.LaneStream`. Every batch must then have the
            same number of rows. The training state restarts from zeros at each epoch; each evaluation run (and
            each evaluation dataloader) streams from zeros with its own state, so evaluating never disturbs the
            training state.
        resets: Where batches mark the start of new sequences (same kinds of places as ``lengths``): a boolean tensor
            of shape ``(B,)`` (the row starts a new sequence at the batch's first step) or laid out like the
            sequences, ``(B, T)`` or ``(T, B)``, ``True`` at each step where a new sequence starts. The state of that
            row is zeroed exactly before that step, also in the middle of a segment (the recurrent call is split
            there), so neither state nor gradient crosses the boundary.
        evaluate: Cut validation, test and prediction batches into segments too, carrying the state, without
            gradients (``True``, default). ``False`` leaves evaluation to Lightning (one call per batch).
        transfer: ``"segment"``: batches stay on the host and each segment is moved to the device right
            before it runs, through the strategy and the module's ``transfer_batch_to_device`` and
            ``on_after_batch_transfer`` hooks (``on_before_batch_transfer`` still runs once per batch). ``None``
            (default): ``"segment"``, unless the ``LightningModule`` or the ``LightningDataModule`` overrides
            ``on_after_batch_transfer`` (which may change the batch's layout, so it must see whole batches). ``"batch"``:
            Lightning moves the whole batch before it is cut.
        stride: Overlapping windows, TBPTT(k1, k2): a training window of ``segment_length`` (k2) steps starts every
            ``stride`` (k1) steps. The state carried into a window is the state at its own first step (taken from the
            previous window after ``stride`` steps); gradients flow through the whole window. The mask of a window
            marks its overlap with the previous one as not new, so metrics and logging count every step once.
            ``None``: ``segment_length`` (plain TBPTT). Evaluation does not overlap (it needs no gradient, and the
            carried state already makes every output exact).
        loss_on: Where :func:`~lightning_tbptt.masked_mean` (the default loss mask) applies with overlapping
            windows: ``"new"`` (default) the new ``stride`` steps of each window, backpropagated through the whole
            window (Williams and Peng's BPTT(h; h')); ``"window"`` every step of the window (steps of the overlap
            then count in several windows' losses).
        burn_in: Steps run before a batch's first window without gradient and without an optimizer step, only to
            refresh the recurrent state (R2D2's burn-in): ``training_step`` runs on them under ``torch.no_grad()``
            with an all-``False`` mask, so they count in no masked loss, metric or token-weighted log. Applies where a
            stream starts from zeros: every batch, or with ``streaming`` the first batch of an epoch or evaluation
            run; in evaluation the steps are run and not counted.
        log_every: When the values logged with ``self.log(..., on_step=True)`` during training reach the loggers.
            ``"step"`` (default): after every optimizer step whose ``global_step`` is a multiple of
            ``Trainer(log_every_n_steps=...)``, at step ``global_step - 1`` (one row per optimizer step; the
            epoch-level and validation rows go to the step of the latest optimizer step too, so a run has one x axis:
            optimizer steps, as in Lightning without TBPTT). ``"batch"``: as Lightning does, once per batch with the
            last segment's values, at the count of batches.
        nonfinite_state: What happens to a carried state that holds a ``NaN`` or an infinity. ``"keep"`` (default):
            it is carried as it is, so one bad step poisons its row (lane) until a reset marker or the next batch
            (with ``streaming``, until a reset marker). ``"reset"``: the state of that row is zeroed at the end of the
            segment, as if a new sequence started there, and a warning names the rows, the batch and the steps
            (costs one host synchronisation per batch).

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
        streaming: bool = False,
        resets: LengthsSpec | None = None,
        evaluate: bool = True,
        transfer: Transfer | None = None,
        stride: int | None = None,
        loss_on: LossOn = "new",
        burn_in: int = 0,
        log_every: LogEvery = "step",
        nonfinite_state: NonfiniteState = "keep",
    ) -> None:
        if segment_length is not None:
            _check_positive_int(segment_length, "segment_length", "TBPTTCallback(segment_length=64)")
        if stride is not None:
            _check_positive_int(stride, "stride", "TBPTTCallback(segment_length=64, stride=16)")
            if segment_length is not None and stride > segment_length:
                raise ConfigurationError(
                    f"Expected argument `stride` to be at most `segment_length={segment_length}` but got {stride}:"
                    " windows would leave steps between them untrained. Pass a stride between 1 and the segment"
                    " length (equal to it for plain TBPTT)."
                )
        if loss_on not in LOSS_ON_CHOICES:
            raise ConfigurationError(
                f"Expected argument `loss_on` to be one of {LOSS_ON_CHOICES} but got {loss_on!r}. Use 'new' for the"
                " loss on each window's new steps (every step counted once) or 'window' for every step of a window."
            )
        if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
            raise ConfigurationError(
                f"Expected argument `burn_in` to be a non-negative integer but got {burn_in!r}. Pass the number of"
                " steps run without gradient before a batch's first window to refresh the state, e.g. `burn_in=32`,"
                " or 0 for none."
            )
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
        if log_every not in LOG_EVERY_CHOICES:
            raise ConfigurationError(
                f"Expected argument `log_every` to be one of {LOG_EVERY_CHOICES} but got {log_every!r}. Use 'step' for"
                " a logger row per optimizer step or 'batch' for one row per batch, as Lightning does."
            )
        if nonfinite_state not in NONFINITE_STATE_CHOICES:
            raise ConfigurationError(
                f"Expected argument `nonfinite_state` to be one of {NONFINITE_STATE_CHOICES} but got"
                f" {nonfinite_state!r}. Use 'keep' to carry the state as it is or 'reset' to zero the rows whose state"
                " is not finite."
            )
        if transfer is not None and transfer not in TRANSFER_CHOICES:
            raise ConfigurationError(
                f"Expected argument `transfer` to be one of {TRANSFER_CHOICES} but got {transfer!r}. Use 'segment' to"
                " move one segment at a time to the device or 'batch' to let Lightning move whole batches."
            )
        self.segment_length = segment_length
        self.time_dim = time_dim
        self.step_per: StepPer = step_per
        self.recurrent_modules = _check_names(recurrent_modules, "recurrent_modules")
        self.exclude_modules = _check_names(exclude_modules, "exclude_modules")
        self.drop_finished = _check_bool(drop_finished, "drop_finished")
        self.streaming = _check_bool(streaming, "streaming")
        self.evaluate = _check_bool(evaluate, "evaluate")
        self.transfer: Transfer | None = transfer
        self._transfer: Transfer = "segment"
        self.stride = stride
        self.loss_on: LossOn = loss_on
        self.burn_in = burn_in
        self.log_every: LogEvery = log_every
        self.nonfinite_state: NonfiniteState = nonfinite_state
        if drop_finished and lengths is None:
            raise ConfigurationError(
                "Expected argument `lengths` to be set with `drop_finished=True` but got None: rows can only be"
                " dropped once their sequence is known to have ended. Pass e.g. `lengths='lengths'`."
            )
        if drop_finished and streaming:
            raise ConfigurationError(
                "`TBPTTCallback(drop_finished=True)` cannot be combined with `streaming=True`: a dropped row's lane"
                " would have no state in the next batch. Use `drop_finished=False`; mark where a lane's next sequence"
                " starts with `resets`."
            )
        self.lengths = lengths
        self.resets = resets
        self._lengths = None if lengths is None else LengthsLocation(lengths)
        self._resets = None if resets is None else LengthsLocation(resets, argument="resets")
        self._fit_segment_length = 0
        self._takes_hiddens = False
        self._split_with_module = False
        self._custom_split = False
        self._schedule: OptimizationSchedule | None = None
        self._carrier: StateCarrier | None = None
        self._patch: TrainingLoopPatch | None = None
        self._strategy_patch: StrategyPatch | None = None
        self._fit_patches: list[FastDevRunPatch | ReleaseOnError | EagerLogging] = []
        self._first_batch_checked = False
        self._modules_checked = False
        self._nonfinite: list[tuple[Tensor, Tensor | None, Segment]] = []
        self._trainer: pl.Trainer | None = None
        self._progress: SegmentProgress | None = None
        # streams of batches: rows per batch, and rows whose sequence ended before their batch did
        self._lanes: dict[str, int] = {}
        self._lanes_restored: set[str] = set()
        self._unfinished: dict[str, Tensor | None] = {}
        self._eval_dataloader: int | None = None
        # where the training epoch stands after the last batch, for checkpoints
        self._position = _Position()
        self._module: pl.LightningModule | None = None
        self._restored: dict[str, Any] | None = None
        self._resumed_epoch: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(segment_length={self.segment_length}, time_dim={self.time_dim},"
            f" step_per={self.step_per!r})"
        )

    def split_batch(self, batch: Any, segment_length: int) -> Sequence[Any]:
        """Cut one batch (of training, validation, test or prediction) into the segments run, in order.

        Override this method to take over splitting. The default cuts every sequence tensor into views of
        ``segment_length`` steps along ``time_dim`` (see :mod:`lightning_tbptt.split`). A ``LightningModule`` that
        defines Lightning 1.x's ``tbptt_split_batch(batch, split_size)`` is honoured instead of this method,
        unless this method is overridden too.

        Args:
            batch: The batch as Lightning passes it to the step (on the host with ``transfer="segment"``).
            segment_length: The segment length of this fit.

        Returns:
            The segments, in time order.

        """
        return split_batch(batch, segment_length, self.time_dim)

    @property
    def _overlaps(self) -> bool:
        return self.stride is not None and self.stride != (self.segment_length or self._fit_segment_length)

    @property
    def resume_batch(self) -> int:
        """How many batches of the current training epoch the checkpoint being resumed had already trained.

        0 unless a fit resumes from a checkpoint saved in the middle of an epoch. A data pipeline that streams lanes
        starts its next training iteration at this batch, so that the carried state and the data line up exactly as
        in an uninterrupted run. (:class:`~lightning_tbptt.data.LaneDataModule` does not need it: its training
        loader saves and restores its position itself.)
        """
        restored = self._restored
        if restored is None:
            return 0
        if self._trainer is not None and restored["epoch"] != self._trainer.current_epoch:
            return 0  # Lightning counts the checkpoint's epoch as finished (e.g. after stopping at `max_steps`)
        if restored.get("mid_epoch", False):
            return int(restored["batches_done"])
        # At the end of an epoch, Lightning before 2.5 runs the epoch's last index once more: give it no data.
        rerun = self._trainer is not None and resume_reruns_last_batch(self._trainer)
        return int(restored["batches_done"]) if rerun else 0

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # The loop is patched here rather than in `on_fit_start`: tuner callbacks (`LearningRateFinder`,
        # `BatchSizeFinder`) run their trial fits in their own `on_fit_start`, which Lightning calls before ours.
        self._teardown()  # also forgets any loaded state: a checkpoint of this run is loaded after `setup`
        follow_trainer_logging(trainer)
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        count = sum(isinstance(callback, TBPTTCallback) for callback in callbacks)
        if count > 1:
            raise ConfigurationError(
                f"Expected one `TBPTTCallback` in `Trainer(callbacks=...)` but got {count}. Keep a single instance"
                " with the segment length and options you want."
            )
        if stage != "fit" and not self.evaluate:
            return
        self._module = pl_module  # kept after teardown: a checkpoint saved after a fit reads its gradients
        self._fit_segment_length = self._resolve_segment_length(pl_module)
        if self.stride is not None and self.stride > self._fit_segment_length:
            raise ConfigurationError(
                f"Expected argument `stride` to be at most the segment length {self._fit_segment_length} (the"
                f" `truncated_bptt_steps` of {type(pl_module).__name__}) but got {self.stride}. Pass a stride between"
                " 1 and the segment length."
            )
        self._check_splitting(pl_module)
        self._transfer = self._resolve_transfer(trainer, pl_module)
        self._trainer = trainer
        self._progress = SegmentProgress(trainer)
        self._first_batch_checked = self._modules_checked = False
        # removed when the stage raises, even if another callback's `on_exception` raises before ours runs
        self._fit_patches = [ReleaseOnError(trainer, self._teardown), EagerLogging(pl_module)]
        if stage == "fit":
            self._check_training(trainer, pl_module)
            self._schedule = OptimizationSchedule()
            self._fit_patches.append(FastDevRunPatch(trainer))
            step_logging = StepLogging(trainer) if self.log_every == "step" else None
            self._patch = TrainingLoopPatch(trainer, self._run_batch, step_logging)
            self._patch.install()
        for patch in self._fit_patches:
            patch.install()
        self._strategy_patch = StrategyPatch(
            trainer, self._keeps_on_host, self._run_evaluation if self.evaluate else None
        )
        self._strategy_patch.install()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._ensure_carrier()

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the checkpoint is restored and before the first batch; Lightning 2.5+ calls no `on_train_epoch_start`
        # for an epoch resumed in the middle, older releases do.
        restored, self._restored = self._restored, None
        self._resumed_epoch = None
        if restored is None and trainer.ckpt_path is not None:
            self._check_resume_without_state(trainer)
        if restored is not None and restored.get("config") is not None:
            self._warn_about_changed_settings(restored["config"])
        if restored is not None and restored.get("streaming", False) != self.streaming:
            raise ConfigurationError(
                f"Expected the checkpoint to come from a fit with `TBPTTCallback(streaming={self.streaming})` but it"
                f" was saved with `streaming={restored.get('streaming', False)}`. Resume with the same setting."
            )
        if restored is not None and restored.get("in_batch"):
            rank_zero_warn(
                f"The checkpoint being resumed was saved while batch {restored['batches_done']} of epoch"
                f" {restored['epoch']} was running (e.g. on an exception or a signal): its parameters may include"
                " some of that batch's segments, which are trained again from the batch's start, and gradients"
                " accumulated before it are not saved. For exact resumption, resume from a checkpoint saved between"
                " batches (e.g. by `ModelCheckpoint`)."
            )
        if restored is not None and resume_reruns_last_batch(trainer):
            complete_batch_saved_at_batch_end(trainer)
        if restored is not None and restored.get("mid_epoch") and restored["epoch"] == trainer.current_epoch:
            self._resume(trainer, restored)
            self._resumed_epoch = trainer.current_epoch

    def _check_resume_without_state(self, trainer: "pl.Trainer") -> None:
        """A checkpoint that holds no state of this callback: refuse what cannot resume exactly, else warn."""
        started = batches_started_in_epoch(trainer)
        if not 0 < started < trainer.num_training_batches:
            return  # resumes at an epoch boundary: nothing is carried across it
        if self.streaming:
            raise ConfigurationError(
                f"Expected the checkpoint {trainer.ckpt_path} to hold the state of `TBPTTCallback` (the carried state"
                f" of every lane), since it was saved in the middle of an epoch ({started} batches done) and"
                " `streaming=True`, but it holds none: it was saved without the callback, or the entry was removed."
                " Resume from a checkpoint saved with the callback, or from one saved at the end of an epoch."
            )
        if trainer.accumulate_grad_batches > 1 or self.step_per == "batch":
            rank_zero_warn(
                f"The checkpoint {trainer.ckpt_path} holds no state of `TBPTTCallback` (it was saved without the"
                f" callback, or the entry was removed) and was saved in the middle of an epoch ({started} batches"
                " done): the accumulated gradients and the count of segments towards the next optimizer step are"
                " unknown, so training resumes from a fresh accumulation. Resume from a checkpoint saved with the"
                " callback for an exact continuation."
            )

    def _settings(self) -> dict[str, Any]:
        """The settings that decide what a resumed fit trains, as saved in checkpoints."""
        return {
            "segment_length": self._fit_segment_length,
            "stride": self.stride or self._fit_segment_length,
            "burn_in": self.burn_in,
            "step_per": self.step_per,
            "time_dim": self.time_dim,
            "loss_on": self.loss_on,
        }

    def _warn_about_changed_settings(self, saved: dict[str, Any]) -> None:
        current = self._settings()
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

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == trainer.current_epoch:
            return
        if self._schedule is not None:
            self._schedule.reset()
        self._reset_stream(_TRAIN)
        self._position = _Position(epoch=trainer.current_epoch)

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_stream(_EVAL)

    @override
    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_stream(_EVAL)

    @override
    def on_predict_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_stream(_EVAL)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._teardown()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._teardown()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._teardown()

    @override
    def state_dict(self) -> dict[str, Any]:
        position = self._position
        state: dict[str, Any] = {
            "version": CHECKPOINT_FORMAT,
            "config": self._settings(),
            "epoch": position.epoch,
            "batches_done": position.batches_done,
            "mid_epoch": 0 < position.batches_done < position.num_batches,
            "accumulated": position.accumulated,
            "partial": position.partial,
            "in_batch": position.in_batch,
            "streaming": self.streaming,
            "world_size": position.world_size,
        }
        # Every process holds its own lanes (and, between the synchronised steps, its own gradients): with several
        # processes these are gathered, each tensor gaining a leading dimension indexed by rank. Lightning builds a
        # checkpoint on every rank at the same point, so all of them reach the collective. Nothing is gathered after
        # a failure (the other processes may not be saving, and a collective would wait for them forever) or inside
        # a batch; such a checkpoint cannot resume several processes.
        trainer = self._trainer
        gather = position.world_size > 1 and trainer is not None and not trainer.interrupted and not position.in_batch
        state["gathered"] = gather
        if position.pending_gradients and not position.in_batch and self._module is not None:
            # read now rather than copied after every batch: between batches only Lightning's release before
            # validation changes them, and a checkpoint must then hold what is left
            parameters = list(self._module.named_parameters())
            if gather:
                # every process gathers every parameter, in one order: a parameter without a gradient on some
                # process is sent as zeros, flagged as absent
                present = [p.grad is not None for _, p in parameters]
                state["gradients"] = self._gathered(
                    {name: p.grad.detach() if p.grad is not None else torch.zeros_like(p) for name, p in parameters}
                )
                flags = torch.tensor(present, dtype=torch.uint8, device=parameters[0][1].device)
                state["gradients_present"] = self._gathered(flags)  # (processes, parameters), in the order above
            else:
                state["gradients"] = {name: p.grad.detach().clone() for name, p in parameters if p.grad is not None}
        if self.streaming:
            state["lanes"] = position.lanes
            state["carried"] = self._gathered(position.carried) if gather else position.carried
            unfinished = None if position.unfinished is None else position.unfinished.to(torch.uint8)
            state["unfinished"] = self._gathered(unfinished) if gather else unfinished
        return state

    def _gathered(self, value: Any) -> Any:
        strategy = None if self._trainer is None else self._trainer.strategy
        assert strategy is not None
        return apply_to_collection(value, Tensor, lambda t: strategy.all_gather(t).cpu())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # used when training resumes (`on_train_start`); `validate`/`test`/`predict` from a checkpoint ignore it
        version = state_dict.get("version", 1)  # release 0.1.0 wrote no version: format 1
        if isinstance(version, bool) or not isinstance(version, int) or version > CHECKPOINT_FORMAT:
            raise ConfigurationError(
                f"Expected the checkpoint's `TBPTTCallback` entry to be in format {CHECKPOINT_FORMAT} or older but it"
                f" is in format {version!r}, written by a newer release of lightning-tbptt. Upgrade lightning-tbptt to"
                " resume from it."
            )
        check_entry(state_dict)
        self._restored = dict(state_dict)

    # ----------------------------------------------------------------------------------------------------------------
    # Checks at set-up
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

    def _resolve_transfer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Transfer:
        if self.transfer is not None:
            return self.transfer
        datamodule = getattr(trainer, "datamodule", None)
        if is_overridden("on_after_batch_transfer", pl_module, trainer) or (
            datamodule is not None and is_overridden("on_after_batch_transfer", datamodule, trainer)
        ):
            return "batch"  # the hook may change the layout: cut what it returns, as without the callback
        return "segment"

    def _check_splitting(self, pl_module: "pl.LightningModule") -> None:
        module_splits = callable(getattr(pl_module, "tbptt_split_batch", None))
        callback_splits = type(self).split_batch is not TBPTTCallback.split_batch
        if module_splits and callback_splits:
            raise ConfigurationError(
                f"Both `{type(self).__name__}.split_batch` and `{type(pl_module).__name__}.tbptt_split_batch` are"
                " defined, so it is unclear which one cuts the batches. Keep only one of them."
            )
        self._split_with_module = module_splits
        self._custom_split = module_splits or callback_splits
        windowed = {"stride": self.stride if self._overlaps else None, "burn_in": self.burn_in or None}
        for argument, value in (("lengths", self.lengths), ("resets", self.resets), *windowed.items()):
            if value is not None and self._custom_split:
                splitter = "tbptt_split_batch" if module_splits else "split_batch"
                raise ConfigurationError(
                    f"`TBPTTCallback({argument}={value!r})` cannot be combined with a custom `{splitter}`: the start"
                    f" of its segments in the batch is unknown, so their {argument} are too. Drop one of the two."
                )

    def _check_training(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = pl_module.training_step
        if is_param_in_hook_signature(step, "dataloader_iter", explicit=True):
            raise ModelError(
                f"`{type(pl_module).__name__}.training_step(dataloader_iter)` fetches its own batches, so"
                " `TBPTTCallback` cannot cut them into segments. Take `training_step(batch, batch_idx)` instead."
            )
        signature = inspect.signature(step)
        parameters = list(signature.parameters)
        # Lightning 1.x passed `hiddens` whenever `truncated_bptt_steps` was set, also to `training_step(*args)`
        steps = getattr(pl_module, "truncated_bptt_steps", 0)
        one_x = isinstance(steps, int) and not isinstance(steps, bool) and steps > 0
        var_positional = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
        self._takes_hiddens = "hiddens" in parameters or (one_x and var_positional)
        if "hiddens" in parameters:
            expected = 2 if is_param_in_hook_signature(step, "batch_idx", min_args=2) else 1
            if parameters.index("hiddens") != expected:
                raise ModelError(
                    f"Expected `{type(pl_module).__name__}.training_step` to take `hiddens` as its argument after"
                    f" `batch` and `batch_idx` but got `training_step{inspect.signature(step)}`. Use"
                    " `training_step(self, batch, batch_idx, hiddens)`."
                )
            for argument, value in (
                ("drop_finished", self.drop_finished),
                ("streaming", self.streaming),
                ("resets", self.resets),
                ("stride", self.stride if self._overlaps else None),
                ("burn_in", self.burn_in or None),
            ):
                if value not in (False, None):
                    raise ConfigurationError(
                        f"`TBPTTCallback({argument}={value!r})` cannot work with `hiddens`, whose layout the callback"
                        " does not know. Let the callback carry the RNN state (drop the `hiddens` argument of"
                        f" `training_step`), or do not set `{argument}`."
                    )
        if self.burn_in and not pl_module.automatic_optimization:
            raise ConfigurationError(
                f"`TBPTTCallback(burn_in={self.burn_in})` cannot work with manual optimization: the burn-in steps run"
                f" `{type(pl_module).__name__}.training_step` without gradient, and that step makes its own backward"
                " and optimizer steps. Use automatic optimization, or `burn_in=0`."
            )
        if self.step_per == "batch" and trainer.strategy.handles_gradient_accumulation:
            raise ConfigurationError(
                f"`TBPTTCallback(step_per='batch')` cannot work with the strategy {type(trainer.strategy).__name__}:"
                " it accumulates gradients itself and steps after every segment. Use `step_per='segment'` or"
                " another strategy."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Running one batch
    # ----------------------------------------------------------------------------------------------------------------

    def _plan(self, batch: Any, stream: str = _TRAIN) -> SegmentPlan:
        if not self._custom_split:
            # burn-in where the stream starts from zeros; windows overlap in training only
            fresh = not self.streaming or not self._lanes.get(stream)
            return plan_segments(
                batch,
                self._fit_segment_length,
                time_dim=self.time_dim,
                lengths=self._lengths,
                drop_finished=self.drop_finished,
                resets=self._resets,
                stride=self.stride if stream == _TRAIN else None,
                burn_in=self.burn_in if fresh else 0,
                whole_burn_in=stream != _TRAIN,
                loss_on_overlap=self.loss_on == "window",
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
            trainer = self._trainer
            self._carrier = StateCarrier(
                modules,
                time_dim=self.time_dim,
                reset_nonfinite=self.nonfinite_state == "reset",
                # hooks left behind by a fit that failed where no hook of ours ran remove themselves when next called
                alive=lambda: trainer.state.status == "running",
            )
        return self._carrier

    def _keeps_on_host(self) -> bool:
        trainer = self._trainer
        if self._transfer != "segment" or trainer is None:
            return False
        if trainer.training:
            return self._patch is not None
        return self.evaluate

    def _reset_stream(self, stream: str) -> None:
        if self._carrier is not None:
            self._carrier.reset(stream)
        self._lanes.pop(stream, None)
        self._unfinished.pop(stream, None)
        if stream == _EVAL:
            self._eval_dataloader = None

    def _begin_batch(self, stream: str, plan: SegmentPlan) -> None:
        """Start a batch of ``stream``: a fresh state, or in streaming mode check that the lanes continue."""
        if not self.streaming:
            self._reset_stream(stream)
            return
        rows = plan.batch_size
        lanes = self._lanes.get(stream)
        if lanes is not None and rows and rows != lanes and stream in self._lanes_restored:
            raise BatchError(
                f"Expected the batches to continue the lanes of the checkpoint being resumed, which carries the"
                f" state of {lanes} lanes, but the batch has {rows} rows. Resume with the data layout"
                " (`lanes`, and the number of processes) the checkpoint was trained with."
            )
        if lanes is not None and rows and rows != lanes:
            raise BatchError(
                f"Expected every batch to have the same number of rows (lanes) with `TBPTTCallback(streaming=True)`,"
                f" since row j continues row j of the previous batch, but got a batch of {rows} rows after batches of"
                f" {lanes}. Give every batch the same rows: `DataLoader(..., drop_last=True)`, or a fixed number of"
                " lanes (`lightning_tbptt.data.LaneStream`)."
            )
        unfinished = self._unfinished.get(stream)
        if unfinished is not None and bool(unfinished.any()):
            restarted = plan.first_starts if plan.first_starts is not None else torch.zeros_like(unfinished)
            missing = torch.nonzero(unfinished & ~restarted).flatten().tolist()
            if missing:
                raise BatchError(
                    f"Expected the rows {missing[:10]} whose sequence ended before the end of the previous batch"
                    " (their lengths were shorter than the batch) to start a new sequence at this batch's first step,"
                    " but their reset markers are not set, so their carried state would include padding. Set"
                    " `resets` and mark those rows' first step, or end sequences only where batches end."
                )
        if rows:
            self._lanes[stream] = rows
        self._lanes_restored.discard(stream)
        self._unfinished[stream] = None if plan.lengths is None else plan.lengths < plan.time_length

    def _prepare(self, planned: PlannedSegment) -> tuple[Any, Segment]:
        """Move a segment to the device when batches stay on the host; its info then describes it there."""
        if not self._keeps_on_host():
            return planned.batch, planned.info
        assert self._strategy_patch is not None
        assert self._trainer is not None
        batch = self._strategy_patch.to_device(planned.batch)
        info = planned.info
        device = self._trainer.strategy.root_device
        if info.device != device:
            lengths = None if info.lengths is None else info.lengths.to(device, non_blocking=True)
            info = dataclasses.replace(info, lengths=lengths, device=device)
        return batch, info

    @contextmanager
    def _running(self, info: Segment, stream: str, carry_at: int | None = None) -> Iterator[None]:
        carrier = self._ensure_carrier()
        with (
            carrier.segment(info.rows, info.batch_size, info.starts, stream, info.length, carry_at),
            running(info),
        ):
            yield
        if carrier.reset_nonfinite:
            self._nonfinite.extend((bad, rows, info) for bad, rows in carrier.take_nonfinite())

    def _run_batch(self, context: BatchContext, run_segment: RunSegment) -> dict[str, Any]:
        assert self._trainer is not None
        assert self._schedule is not None
        if "batch" not in context.kwargs:
            raise ModelError(
                "`TBPTTCallback` cannot cut batches that `training_step` fetches itself from a `dataloader_iter`. Take"
                " `training_step(batch, batch_idx)` instead."
            )
        trainer = self._trainer
        schedule: OptimizationSchedule = self._schedule
        try:
            plan = self._plan(context.kwargs["batch"])
            self._begin_batch(_TRAIN, plan)
        except Exception as error:
            # the other processes are about to wait for this one in the agreement: let them stop too, with the cause
            agree_on_segment_count(trainer, 0, automatic=context.automatic, error=error)
            raise
        total = agree_on_segment_count(trainer, plan.steps, automatic=context.automatic)
        self._position.in_batch = True
        step_per: StepPer = "batch" if context.skip_backward else self.step_per

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

        progress = self._progress
        assert progress is not None
        try:
            output, index, decision = self._run_segments(context, run_segment, plan, total, decide, progress)
        finally:
            progress.done()
        if plan.steps >= 2 and not self._first_batch_checked:
            self._first_batch_checked = True
            self._warn_if_nothing_is_carried()
        self._report_nonfinite(f"training batch {self._position.batches_done} of epoch {trainer.current_epoch}")
        self._record_position(trainer, partial=index < total - 1, pending=decision is not None and not decision.step)
        if self._takes_hiddens:  # as in Lightning 1.x, the outputs handed to `on_train_batch_end` hold no `hiddens`
            output = {key: value for key, value in output.items() if key != "hiddens"}
        return output

    def _warn_if_nothing_is_carried(self) -> None:
        """After the first batch of several segments: name the modules that always got a state explicitly."""
        names = [] if self._takes_hiddens else self._ensure_carrier().given_explicit_state()
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
        if self._takes_hiddens or self._trainer is None:
            return
        carrier = self._ensure_carrier()
        found = recurrent_candidates(self._trainer.lightning_module, self.recurrent_modules, self.exclude_modules)
        new = sorted(set(found) - set(carrier.modules))
        if new:
            rank_zero_warn(
                f"`TBPTTCallback` does not carry the state of {new}: they did not exist when the fit started (they"
                " were created in `on_train_start` or in a step), so no hook was added to them and every segment"
                " starts them from zeros. Create recurrent modules in `__init__` or `configure_model`, or pass"
                f" `exclude_modules={new}` to silence this warning."
            )

    def _report_nonfinite(self, where: str) -> None:
        """Warn about the rows whose non-finite state was reset in this batch (one host synchronisation)."""
        if not self._nonfinite:
            return
        entries, self._nonfinite = self._nonfinite, []
        flagged = torch.stack([bad.any() for bad, _, _ in entries]).tolist()
        trainer = self._trainer
        process = f"process {trainer.global_rank}: " if trainer is not None and trainer.world_size > 1 else ""
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

    def _run_segments(
        self,
        context: BatchContext,
        run_segment: RunSegment,
        plan: SegmentPlan,
        total: int,
        decide: Callable[[int], Decision | None],
        progress: SegmentProgress,
    ) -> tuple[dict[str, Any], int, Decision | None]:
        """Run the segments of a training batch, then the idle steps up to ``total``."""
        assert self._trainer is not None
        trainer = self._trainer
        hiddens = None
        output: dict[str, Any] = {}
        decision = None
        index = -1
        stopped = False
        for planned in plan:
            if planned.info.burn_in:
                self._burn_in(context, planned)
                continue
            index += 1
            kwargs = OrderedDict(context.kwargs)
            kwargs["batch"], info = self._prepare(planned)
            if info.count != total + plan.burn_in_segments:  # other processes run more: this one takes part in all
                info = dataclasses.replace(info, count=total + plan.burn_in_segments)
            if self._takes_hiddens:
                kwargs["hiddens"] = hiddens
            decision = decide(index)
            progress.show(index, total)
            with self._running(info, _TRAIN, planned.carry_at):
                output = run_segment(kwargs, decision, info.num_valid)
            if not self._modules_checked:
                self._modules_checked = True
                self._warn_about_new_modules()
            if self._takes_hiddens:
                hiddens = self._returned_hiddens(output, index)
            stopped = 0 <= trainer.max_steps <= trainer.global_step
            if stopped:
                break
        # Other processes have more segments in this batch: take part in each of their steps with zero gradients.
        while not stopped and index < total - 1:
            index += 1
            decision = decide(index)
            kwargs = OrderedDict(context.kwargs)
            kwargs["batch"] = None
            progress.show(index, total)
            burn_in = plan.burn_in_segments
            idle = Segment(index + burn_in, total + burn_in, None, 0, self.time_dim, num_valid=0)
            with idle_training_step(trainer.lightning_module, trainer.strategy), running(idle):
                run_segment(kwargs, decision, 0)
            stopped = 0 <= trainer.max_steps <= trainer.global_step
        return output, index, decision

    def _record_position(self, trainer: "pl.Trainer", partial: bool, pending: bool) -> None:
        """After a training batch: where the epoch stands, what a checkpoint taken now must hold to resume exactly."""
        assert self._schedule is not None
        carrier = self._ensure_carrier()
        self._position = _Position(
            epoch=trainer.current_epoch,
            batches_done=self._position.batches_done + 1,
            num_batches=trainer.num_training_batches,
            accumulated=self._schedule.accumulated,
            partial=partial,
            pending_gradients=pending,
            lanes=self._lanes.get(_TRAIN),
            carried=dict(carrier.carried_in(_TRAIN)),
            unfinished=self._unfinished.get(_TRAIN),
            world_size=trainer.world_size,
        )

    def _run_evaluation(
        self, name: str, step: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        assert self._trainer is not None
        trainer = self._trainer
        module_step = getattr(trainer.lightning_module, name)
        if not args or is_param_in_hook_signature(module_step, "dataloader_iter", explicit=True):
            raise ModelError(
                f"`TBPTTCallback` cannot cut the batches of `{name}`, which fetches its own batches from a"
                f" `dataloader_iter`. Take `{name}(batch, batch_idx)` instead, or pass `TBPTTCallback(evaluate=False)`."
            )
        batch, rest = args[0], args[1:]
        if self.streaming:
            dataloader = rest[1] if len(rest) > 1 else kwargs.get("dataloader_idx", 0)
            if dataloader != self._eval_dataloader:
                self._reset_stream(_EVAL)
                self._eval_dataloader = dataloader
        plan = self._plan(batch, _EVAL)
        self._begin_batch(_EVAL, plan)
        outputs: list[Any] = []
        segments: list[Segment] = []
        progress = self._progress
        assert progress is not None
        try:
            for planned in plan:
                segment_batch, info = self._prepare(planned)
                progress.show(info.index, len(plan))
                silenced = _not_logging(trainer.lightning_module) if info.burn_in else nullcontext()
                with self._running(info, _EVAL), silenced:
                    set_log_weight(trainer, info.num_valid)
                    try:
                        outputs.append(step(segment_batch, *rest, **kwargs))
                    finally:
                        set_log_weight(trainer, None)
                segments.append(info)
        finally:
            progress.done()
        self._report_nonfinite(f"{name.removesuffix('_step')} batch {rest[0] if rest else '?'}")
        return join_outputs(outputs, segments, batch_size=plan.batch_size, time_length=plan.time_length)

    def _burn_in(self, context: BatchContext, planned: PlannedSegment) -> None:
        """Run ``training_step`` on a burn-in prefix without gradient or optimizer step: only its state counts."""
        assert self._trainer is not None
        kwargs = OrderedDict(context.kwargs)
        kwargs["batch"], info = self._prepare(planned)
        with torch.no_grad(), self._running(info, _TRAIN), _not_logging(self._trainer.lightning_module):
            call_training_step(self._trainer, kwargs)

    def _returned_hiddens(self, output: dict[str, Any], index: int) -> Any:
        if "hiddens" not in output:
            raise ModelError(
                f"Expected `training_step(batch, batch_idx, hiddens)` to return a dict with the key 'hiddens' but"
                f" segment {index} returned {f'the keys {sorted(output)}' if output else 'nothing'}, so the state"
                " of the next segment is unknown. Return `{'loss': loss, 'hiddens': new_hiddens}`."
            )
        output["hiddens"] = detach_state(output["hiddens"])
        return output["hiddens"]

    def _resume(self, trainer: "pl.Trainer", restored: dict[str, Any]) -> None:
        """Continue the epoch of a checkpoint saved mid-epoch: its position, accumulation and carried state."""
        batch = int(restored["batches_done"])
        if restored.get("partial"):
            rank_zero_warn(
                f"The checkpoint being resumed was saved after `max_steps` stopped batch {batch - 1} of its epoch"
                " before its last segment; training continues with the next batch, so the rest of that batch is never"
                " trained and the result differs from one longer run. For exact resumption, choose `max_steps` as a"
                " multiple of the optimizer steps per batch."
            )
        saved_world = int(restored.get("world_size", 1))
        needs_processes = self.streaming or restored.get("gradients") is not None
        if needs_processes and saved_world > 1 and not restored.get("gathered", False):
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
        restored = self._own_part(restored, trainer)
        if self._schedule is not None:
            self._schedule.accumulated = int(restored.get("accumulated", 0))
        gradients = restored.get("gradients")
        if gradients is not None:
            for name, parameter in trainer.lightning_module.named_parameters():
                saved = gradients.get(name)
                parameter.grad = None if saved is None else saved.to(parameter.device)
        self._reset_stream(_TRAIN)
        if self.streaming:
            self._restore_stream(trainer, restored)
        # a checkpoint taken before the first resumed batch ends must hold all of this again
        self._position = _Position(
            epoch=int(restored["epoch"]),
            batches_done=batch,
            num_batches=trainer.num_training_batches,
            accumulated=int(restored.get("accumulated", 0)),
            pending_gradients=gradients is not None,
            lanes=self._lanes.get(_TRAIN),
            carried=dict(self._ensure_carrier().carried_in(_TRAIN)),
            unfinished=self._unfinished.get(_TRAIN),
            world_size=trainer.world_size,
        )

    def _restore_stream(self, trainer: "pl.Trainer", restored: dict[str, Any]) -> None:
        device = trainer.strategy.root_device
        carried = restored.get("carried") or {}
        carrier = self._ensure_carrier()
        missing = sorted(set(carried) - set(carrier.modules))
        if missing:
            raise ConfigurationError(
                f"Expected the checkpoint's carried state to belong to this model's recurrent modules"
                f" {sorted(carrier.modules)} but it holds the state of {missing}. Resume with the model (and"
                " `recurrent_modules`/`exclude_modules`) the checkpoint was saved with."
            )
        check_carried(carried, carrier.modules)
        carrier.restore(_TRAIN, apply_to_collection(carried, Tensor, lambda t: t.to(device)))
        if restored.get("lanes"):
            self._lanes[_TRAIN] = int(restored["lanes"])
            self._lanes_restored.add(_TRAIN)
        unfinished = restored.get("unfinished")
        self._unfinished[_TRAIN] = None if unfinished is None else unfinished.cpu().bool()

    @staticmethod
    def _own_part(restored: dict[str, Any], trainer: "pl.Trainer") -> dict[str, Any]:
        """The part of a checkpoint gathered from several processes that belongs to this process."""
        if not restored.get("gathered", False):
            return restored
        rank = trainer.global_rank
        own = dict(restored)
        for key in ("gradients", "gradients_present", "carried", "unfinished"):
            own[key] = apply_to_collection(restored.get(key), Tensor, lambda t: t[rank])
        present = own.pop("gradients_present", None)
        if present is not None and own.get("gradients") is not None:
            gradients = own["gradients"].items()
            own["gradients"] = {name: g for (name, g), flag in zip(gradients, present.tolist(), strict=True) if flag}
        return own

    def _teardown(self) -> None:
        self._restored = None
        self._resumed_epoch = None
        for patch in (self._patch, self._strategy_patch, *self._fit_patches):
            if patch is not None:
                patch.remove()
        self._patch = None
        self._strategy_patch = None
        self._fit_patches = []
        self._nonfinite.clear()
        if self._carrier is not None:
            self._carrier.remove()
            self._carrier = None
        self._schedule = None
        self._trainer = None
        self._progress = None
        self._lanes.clear()
        self._unfinished.clear()
