"""``TBPTTCallback``: train an unmodified ``LightningModule`` on long sequences, segment by segment.

The callback is a shell: its arguments become :class:`~lightning_tbptt.config.Settings` at construction, and each
hook delegates to the :class:`~lightning_tbptt.fit.Fit` created in ``setup`` and released in ``teardown`` (its
record of where training stands stays, for a checkpoint saved after the fit).
"""

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from typing_extensions import override

from lightning_tbptt.checkpoint import CheckpointRecord, check_carried
from lightning_tbptt.config import LogEvery, NonfiniteState, Settings, Transfer
from lightning_tbptt.dynamic import DynamicEvaluation
from lightning_tbptt.errors import ConfigurationError
from lightning_tbptt.fields import FieldSpec
from lightning_tbptt.fit import Fit, gather_facts, refuse_for
from lightning_tbptt.namespaces import CallbackBase
from lightning_tbptt.probe import ProbeResult
from lightning_tbptt.protocol import StateSpec
from lightning_tbptt.random_lengths import RandomLengths
from lightning_tbptt.schedule import StepPer
from lightning_tbptt.split import split_batch
from lightning_tbptt.state import detach_state
from lightning_tbptt.streams import EVAL, TRAIN
from lightning_tbptt.windows import LossOn, training_windows

if TYPE_CHECKING:
    import pytorch_lightning as pl


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
            (Lightning 1.x style). ``"auto"``: the truncation probe chooses it between batches, on the grid
            ``min_segment_length * 2**i`` up to ``max_segment_length``, starting from the longest (see
            :mod:`lightning_tbptt.probe` and the guide "choosing the segment length").
        time_dim: The time dimension of sequence tensors: 1 for batch-first ``(B, T, ...)``, 0 for ``(T, B, ...)``.
            Which tensors count as sequences is documented in :mod:`lightning_tbptt.split`.
        step_per: ``"segment"`` (the default, unless ``exact``): an optimizer step after every segment (classic
            TBPTT). ``"batch"`` (the default with ``exact``): the gradients of all segments of a batch are accumulated
            into one step per batch. ``Trainer(accumulate_grad_batches=N)`` then counts segments or batches
            respectively (see :mod:`lightning_tbptt.schedule`).
        exact: One optimizer step per batch with the exact gradient of the summed segment losses backpropagated
            through the whole batch (no truncation), at the memory of one segment plus the state at each segment
            boundary: every segment runs forward without gradient first, then again with gradient, last to first,
            with the random numbers of its first run (see :mod:`lightning_tbptt.exact`). Costs about one extra
            forward per segment. Refused with ``stride``, ``burn_in``, ``step_per="segment"``, manual optimization and
            Lightning 1.x ``hiddens``.
        recurrent_modules: Names (as in ``model.named_modules()``) of custom recurrent modules whose state is
            carried too; they must follow ``forward(input, state=None) -> (output, new_state)``. Or a mapping of names
            to state specs, for modules that take or return their state elsewhere: a
            :class:`~lightning_tbptt.protocol.StateSpec`, a string ``"IN -> OUT"`` (``{"layer": "initial_state ->
            1"}``) or a mapping of its fields (``{"xl": {"state_in": "mems", "state_out": "mems", "output":
            "hidden", "batch_dim": 1}}``); see :mod:`lightning_tbptt.protocol`.
        exclude_modules: Names of modules whose state must not be carried (they start from zeros in every segment).
        lengths: Where batches carry the lengths of their padded sequences: a key, an index, a path of those, or a
            callable (see :mod:`lightning_tbptt.fields`). Segments then carry their own lengths in that place,
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
        probe_every: Run the truncation probe on every ``probe_every``-th training batch (the first included): it
            measures, on the batch's first ``probe_horizon`` steps and before the batch trains, the relative bias of
            the truncated gradient at the segment length in use and at shorter and longer ones, and how the gradient
            decays through the carried state; logs them as ``tbptt/probe_*``, shows the bias in the progress bar and
            keeps them in :attr:`probe_result`. It changes nothing in training (parameters, state, random numbers and
            metrics are as without it) and costs time only on the batches it runs. ``None`` (default): no probe,
            unless ``segment_length="auto"`` (then every 20 batches).
        probe_tolerance: The relative bias ``δ`` in (0, 1) a segment length may have: the probe suggests the shortest
            length below it, and ``"auto"`` moves towards it. Default 0.1.
        probe_horizon: Time steps the probe measures from the start of the batch; it holds their graph at once
            (memory of ``probe_horizon / segment_length`` segments). Default: 4 * ``segment_length``; with
            ``"auto"``, 2 * the longest length.
        min_segment_length: With ``segment_length="auto"``: the shortest segment length (default 8).
        max_segment_length: With ``segment_length="auto"``: the longest segment length (default 512).
        random_lengths: Draw the length of every training segment (of every window's new steps, with ``stride``)
            instead of cutting at fixed places: a :class:`~lightning_tbptt.random_lengths.RandomLengths` (AWD-LSTM's
            rule around ``segment_length``, or a random first cut), seeded by its ``seed``, the epoch and the batch
            index, so the draws are reproducible, the same on every process and resumed exactly; optionally scales
            the learning rate by the drawn length (see :mod:`lightning_tbptt.random_lengths`). Evaluation keeps
            fixed segments. ``None`` (default): fixed cuts.
        dynamic_eval: Dynamic evaluation: a :class:`~lightning_tbptt.dynamic.DynamicEvaluation`. After each
            evaluation segment is scored (its ``validation_step``/``test_step``/``predict_step`` run and logged), a
            gradient step on that segment's loss adapts the weights for the next one; the trained weights come back,
            bitwise, after each dataloader's last batch (or when the run ends, or raises; see
            :mod:`lightning_tbptt.dynamic`). ``None`` (default): the weights are fixed during evaluation.

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
        segment_length: int | Literal["auto"] | None = None,
        *,
        time_dim: int = 1,
        step_per: StepPer | None = None,
        exact: bool = False,
        recurrent_modules: Sequence[str] | Mapping[str, StateSpec | str | Mapping[str, Any]] = (),
        exclude_modules: Sequence[str] = (),
        lengths: FieldSpec | None = None,
        drop_finished: bool = False,
        streaming: bool = False,
        resets: FieldSpec | None = None,
        evaluate: bool = True,
        transfer: Transfer | None = None,
        stride: int | None = None,
        loss_on: LossOn = "new",
        burn_in: int = 0,
        log_every: LogEvery = "step",
        nonfinite_state: NonfiniteState = "keep",
        probe_every: int | None = None,
        probe_tolerance: float | None = None,
        probe_horizon: int | None = None,
        min_segment_length: int | None = None,
        max_segment_length: int | None = None,
        random_lengths: RandomLengths | Mapping[str, Any] | None = None,
        dynamic_eval: DynamicEvaluation | Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = Settings.from_arguments(
            segment_length,
            time_dim=time_dim,
            step_per=step_per,
            exact=exact,
            recurrent_modules=recurrent_modules,
            exclude_modules=exclude_modules,
            lengths=lengths,
            drop_finished=drop_finished,
            streaming=streaming,
            resets=resets,
            evaluate=evaluate,
            transfer=transfer,
            stride=stride,
            loss_on=loss_on,
            burn_in=burn_in,
            log_every=log_every,
            nonfinite_state=nonfinite_state,
            probe_every=probe_every,
            probe_tolerance=probe_tolerance,
            probe_horizon=probe_horizon,
            min_segment_length=min_segment_length,
            max_segment_length=max_segment_length,
            random_lengths=random_lengths,
            dynamic_eval=dynamic_eval,
        )
        """The checked settings (frozen)."""
        self.lengths = lengths
        self.resets = resets
        self._fit: Fit | None = None
        self._trained: dict[str, Any] = {}  # the training stream's state at the end of the last fit
        self._evaluate_from: str | Mapping[str, Any] | None = None

    # the arguments, as given (read-only: a changed setting would not be checked)
    segment_length = property(lambda self: "auto" if self.settings.auto else self.settings.geometry.segment_length)
    stride = property(lambda self: self.settings.geometry.stride)
    burn_in = property(lambda self: self.settings.geometry.burn_in)
    loss_on = property(lambda self: self.settings.geometry.loss_on)
    time_dim = property(lambda self: self.settings.layout.time_dim)
    drop_finished = property(lambda self: self.settings.layout.drop_finished)
    step_per = property(lambda self: self.settings.step_per)
    exact = property(lambda self: self.settings.exact)
    streaming = property(lambda self: self.settings.streaming)
    evaluate = property(lambda self: self.settings.evaluate)
    transfer = property(lambda self: self.settings.transfer)
    log_every = property(lambda self: self.settings.log_every)
    nonfinite_state = property(lambda self: self.settings.nonfinite_state)
    recurrent_modules = property(
        lambda self: dict(self.settings.state_specs) if self.settings.state_specs else self.settings.recurrent_modules
    )
    exclude_modules = property(lambda self: self.settings.exclude_modules)

    random_lengths = property(lambda self: self.settings.random_lengths)
    dynamic_eval = property(lambda self: self.settings.dynamic_eval)
    probe_every = property(lambda self: None if self.settings.probe is None else self.settings.probe.every)

    @property
    def current_segment_length(self) -> int | None:
        """The segment length the next training batch is cut with: the fixed one, or what ``"auto"`` chose last.

        ``None`` before a fit when it comes from the module's ``truncated_bptt_steps``.
        """
        if self._fit is not None:
            return self._fit.segment_length
        return self.settings.geometry.segment_length

    @property
    def probe_result(self) -> ProbeResult | None:
        """What the last truncation probe of the last fit measured (see ``probe_every``), or ``None``."""
        return None if self._fit is None else self._fit.probe_result

    def __repr__(self) -> str:
        probe = f", probe_every={self.probe_every}" if self.probe_every is not None else ""
        return (
            f"{type(self).__name__}(segment_length={self.segment_length!r}, time_dim={self.time_dim},"
            f" step_per={self.step_per!r}" + (", exact=True" if self.exact else "") + probe + ")"
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

    def training_segments(
        self, length: int, *, fresh: bool = True, epoch: int | None = None, batch: int | None = None
    ) -> int:
        """The segments that train in a batch of ``length`` time steps (every step valid; burn-in excluded).

        With ``step_per="segment"`` these are the optimizer steps the batch takes. ``fresh``: the batch starts its
        stream from zeros, so a ``burn_in`` prefix runs first (every batch, or with ``streaming`` the first batch of
        an epoch). With ``segment_length="auto"``, for the segment length in use (:attr:`current_segment_length`).
        With ``random_lengths``, for the lengths drawn for training batch ``batch`` (from 0) of ``epoch``, which must
        then be given.

        Example:
            >>> TBPTTCallback(16, stride=8, burn_in=4).training_segments(64)
            7

        Raises:
            ConfigurationError: If the segment length is not known before a fit (it comes from the module), or
                ``random_lengths`` is set and ``epoch`` or ``batch`` is not given.

        """
        geometry = self.settings.geometry
        segment_length = self.current_segment_length
        if segment_length is None:
            raise ConfigurationError(
                "Expected argument `segment_length` of `TBPTTCallback` to be set to count the segments of a batch but"
                " got None (the segment length comes from the module's `truncated_bptt_steps`). Pass"
                " `TBPTTCallback(segment_length=...)`."
            )
        burn_in = geometry.burn_in if fresh else 0
        random_lengths = self.settings.random_lengths
        if random_lengths is None:
            return training_windows(length, segment_length, geometry.stride, burn_in)
        if epoch is None or batch is None:
            raise ConfigurationError(
                f"Expected `training_segments` to get the `epoch` and `batch` whose drawn lengths to count, with"
                f" `random_lengths`, but got epoch={epoch!r}, batch={batch!r}. Pass e.g."
                f" `training_segments({length}, epoch=0, batch=0)`."
            )
        drawn = random_lengths.new_steps(geometry.stride or segment_length, epoch=epoch, batch=batch)
        return training_windows(length, segment_length, geometry.stride, burn_in, drawn)

    @property
    def resume_batch(self) -> int:
        """How many batches of the current training epoch the checkpoint being resumed had already trained.

        0 unless a fit resumes from a checkpoint saved in the middle of an epoch. A data pipeline that streams lanes
        starts its next training iteration at this batch, so that the carried state and the data line up exactly as
        in an uninterrupted run. (:class:`~lightning_tbptt.data.LaneDataModule` does not need it: its training
        loader saves and restores its position itself.)
        """
        fit = self._fit
        return 0 if fit is None or not fit.active else fit.resume_batch()

    def release(self) -> None:
        """Remove every patch and hook of the running fit (safe to call more than once)."""
        if self._fit is not None:
            if self._fit.training and self._fit.active:
                self._trained = detach_state(dict(self._fit.streams[TRAIN].state.carried))
            self._fit.remove()

    # ----------------------------------------------------------------------------------------------------------------
    # The carried state, read and set from outside
    # ----------------------------------------------------------------------------------------------------------------

    def carried_state(self) -> dict[str, Any]:
        """The recurrent state the training stream carries into its next segment: module name -> state (detached).

        During a fit, the live state (between batches: what the next batch starts from, with ``streaming=True``);
        after a fit, the state its last segment ended with; empty before any fit. The tensors are the carried ones:
        copy them to keep them past the next segment.
        """
        fit = self._active()
        if fit is not None and fit.training:
            return dict(fit.streams[TRAIN].state.carried)
        return dict(self._trained)

    def reset_state(self, lanes: Sequence[int] | Tensor | None = None) -> None:
        """Start the training stream anew: every lane (``None``), or the lanes (rows) listed, from zeros.

        Call it between batches of a fit (e.g. from a callback's ``on_train_batch_start``, or the module's); with
        ``streaming=True`` the next batch starts from the state it leaves. A checkpoint saved afterwards holds it.

        Raises:
            ConfigurationError: Outside a fit, or with a lane that the stream does not have.

        """
        fit = self._training("reset_state")
        stream = fit.streams[TRAIN]
        if lanes is None:
            stream.state.clear()
            return
        count = stream.lanes or 0
        if count == 0 and not stream.state.carried:
            return  # before the first batch: every lane starts from zeros anyway
        given = torch.as_tensor(lanes)
        if given.dtype == torch.bool:
            if given.shape != (count,):
                raise ConfigurationError(
                    f"Expected a boolean `lanes` mask to have one entry per lane of the training stream ({count}) but"
                    f" got shape {tuple(given.shape)}. Pass a mask of {count} entries, or the lanes' indices."
                )
            fit.zero_lanes(given.cpu())
            return
        picked = given.long().flatten()
        if picked.numel() == 0 or int(picked.min()) < 0 or int(picked.max()) >= count:
            raise ConfigurationError(
                f"Expected `lanes` to list rows of the training stream, 0 to {count - 1}, but got {picked.tolist()}."
                " Pass the lanes to start anew, a boolean mask of them, or None for every lane."
            )
        mask = torch.zeros(count, dtype=torch.bool)
        mask[picked] = True
        fit.zero_lanes(mask)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Carry ``state`` (module name -> state) into the training stream's next segment.

        The form is what :meth:`carried_state` returns; it replaces what the stream carries, and modules left out
        keep theirs.

        Raises:
            ConfigurationError: Outside a fit, or for a module the callback does not carry, or a ``torch.nn`` RNN
                state of the wrong form.

        """
        fit = self._training("set_state")
        modules = fit.carrier.modules
        unknown = sorted(set(state) - set(modules))
        if unknown:
            raise ConfigurationError(
                f"Expected `set_state` to get the states of carried modules, {sorted(modules)}, but got {unknown}."
                " Pass the states of those modules (as `carried_state()` returns them)."
            )
        check_carried(state, modules)
        carried = fit.streams[TRAIN].state
        for name, value in state.items():
            carried.carried[name] = detach_state(value)
            carried.rows[name] = (None, 0)

    def evaluate_from(self, state: Literal["train"] | Mapping[str, Any] | None) -> None:
        """Start every later evaluation run (``validate``, ``test``, ``predict``) from a state rather than zeros.

        ``"train"``: the training stream's state (see :meth:`carried_state`), as it is when the run starts; a mapping
        of module names to states; ``None``: zeros again. Each evaluation dataloader starts from it. Needs
        ``streaming=True`` (the state continues lanes: the evaluation batches must have the rows the state has).

        Raises:
            ConfigurationError: Without ``streaming=True``, or for another value.

        """
        if not self.streaming:
            raise ConfigurationError(
                "Expected `TBPTTCallback(streaming=True)` for `evaluate_from`: without streaming every evaluation batch"
                " starts from zeros, so no state could be continued. Pass `streaming=True` (lanes) to continue one."
            )
        if not (state is None or state == "train" or isinstance(state, Mapping)):
            raise ConfigurationError(
                f"Expected `evaluate_from` to get 'train', a mapping of module names to states, or None but got"
                f" {state!r}."
            )
        self._evaluate_from = state

    def _training(self, method: str) -> Fit:
        fit = self._active()
        if fit is None or not fit.training:
            raise ConfigurationError(
                f"`TBPTTCallback.{method}` works on the training stream of a running fit: call it between batches"
                " (e.g. from `on_train_batch_start`). To start an evaluation from a state, use `evaluate_from`."
            )
        if not self.streaming:
            raise ConfigurationError(
                f"Expected `TBPTTCallback(streaming=True)` for `{method}`: without streaming every batch starts from"
                " zeros, so the state would be dropped at the next batch. Pass `streaming=True` (lanes) to carry it."
            )
        return fit

    # ----------------------------------------------------------------------------------------------------------------
    # Lightning hooks: each delegates to the fit
    # ----------------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # The loop is patched here rather than in `on_fit_start`: tuner callbacks (`LearningRateFinder`,
        # `BatchSizeFinder`) run their trial fits in their own `on_fit_start`, which Lightning calls before ours.
        self.release()  # also forgets any loaded state: a checkpoint of this run is loaded after `setup`
        callbacks: list[Any] = trainer.callbacks  # type: ignore[attr-defined]
        facts = gather_facts(
            self.settings,
            trainer,
            pl_module,
            stage,
            callbacks=sum(isinstance(callback, TBPTTCallback) for callback in callbacks),
            callback=type(self).__name__,
            callback_splits=type(self).split_batch is not TBPTTCallback.split_batch,
        )
        refuse_for(self.settings, facts, stage)
        if stage != "fit" and not self.evaluate:
            return
        # where training stands stays that of the last fit through a later validate/test/predict (its checkpoints)
        record = self._fit.record if self._fit is not None and stage != "fit" else None
        self._fit = Fit(
            self.settings, trainer, pl_module, stage, facts, split_batch=self.split_batch, release=self.release
        )
        if record is not None:
            self._fit.record = record

    def _active(self) -> Fit | None:
        fit = self._fit
        return fit if fit is not None and fit.active else None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (fit := self._active()) is not None:
            fit.runner  # noqa: B018  # hooks the recurrent modules, which exist now (after `configure_model`)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # After the checkpoint is restored and before the first batch; Lightning 2.5+ calls no `on_train_epoch_start`
        # for an epoch resumed in the middle, older releases do.
        if (fit := self._active()) is not None:
            fit.start_training()

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (fit := self._active()) is not None:
            fit.start_epoch()

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_evaluation("validate")

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end_evaluation()

    @override
    def on_test_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_evaluation("test")

    @override
    def on_test_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end_evaluation()

    @override
    def on_predict_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_evaluation("predict")

    @override
    def on_predict_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end_evaluation()

    def _end_evaluation(self) -> None:
        # before `on_validation_end`, where e.g. `ModelCheckpoint` saves: it must save the trained weights
        if (fit := self._active()) is not None:
            fit.end_evaluation()

    def _reset_evaluation(self, stage: str) -> None:
        if (fit := self._active()) is not None:
            given = self._evaluate_from
            start = self.carried_state() if isinstance(given, str) else None if given is None else dict(given)
            if start is not None and given != "train":
                modules = fit.carrier.modules
                unknown = sorted(set(start) - set(modules))
                if unknown:
                    raise ConfigurationError(
                        f"Expected `evaluate_from` to get the states of carried modules, {sorted(modules)}, but got"
                        f" {unknown}. Pass the states of those modules (as `carried_state()` returns them)."
                    )
                check_carried(start, modules)
            fit.streams[EVAL].start = None if start is None else detach_state(start)
            fit.reset_stream(EVAL)
            fit.start_evaluation(stage)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.release()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.release()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.release()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._fit is None:  # no fit yet: where a fresh one starts
            return CheckpointRecord(streaming=self.streaming, config=self.settings.saved()).to_dict()
        return self._fit.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # used when training resumes (`on_train_start`); `validate`/`test`/`predict` from a checkpoint ignore it
        record = CheckpointRecord.from_dict(state_dict)
        if (fit := self._active()) is not None:
            fit.restored = record
