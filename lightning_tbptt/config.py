"""The callback's settings as frozen values, and every combination it refuses, as one table.

``TBPTTCallback`` takes flat keyword arguments (they suit ``LightningCLI``); :meth:`Settings.from_arguments` checks
each value and turns them into a :class:`Settings`: the window :class:`~lightning_tbptt.windows.Geometry`, the
:class:`BatchLayout` (where time and the lengths and reset markers are) and the rest. What a fit adds (the module's
segment length, a custom split, Lightning 1.x ``hiddens``, the strategy) is gathered once into :class:`FitFacts`.
:data:`REFUSALS` lists every combination refused, in the order they are checked; :func:`refuse` raises the first that
applies at a stage: ``"init"`` (the arguments alone), ``"setup"`` (any stage of a fit) or ``"training"``.

Example:
    >>> settings = Settings.from_arguments(segment_length=8, stride=4)
    >>> settings.geometry.overlaps, settings.layout.time_dim
    (True, 1)
    >>> Settings.from_arguments(segment_length=8, drop_finished=True)
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.ConfigurationError: Expected argument `lengths` to be set with `drop_finished=True` but got None: rows can only be dropped once their sequence is known to have ended. Pass e.g. `lengths='lengths'`.

"""  # noqa: E501

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_tbptt.dynamic import DynamicEvaluation
from lightning_tbptt.errors import ConfigurationError, ModelError, TBPTTError
from lightning_tbptt.fields import FieldLocation, FieldSpec
from lightning_tbptt.probe import ProbeSettings
from lightning_tbptt.protocol import StateSpec
from lightning_tbptt.random_lengths import RandomLengths
from lightning_tbptt.schedule import STEP_PER_CHOICES, StepPer
from lightning_tbptt.windows import LOSS_ON_CHOICES, Geometry, LossOn

Transfer = Literal["segment", "batch"]
TRANSFER_CHOICES: tuple[Transfer, ...] = ("segment", "batch")
LogEvery = Literal["step", "batch"]
LOG_EVERY_CHOICES: tuple[LogEvery, ...] = ("step", "batch")
NonfiniteState = Literal["keep", "reset"]
NONFINITE_STATE_CHOICES: tuple[NonfiniteState, ...] = ("keep", "reset")
Stage = Literal["init", "setup", "training"]


def check_positive_int(
    value: Any, argument: str, example: str, what: str = "the number of time steps per segment"
) -> int:
    """Return ``value`` if it is a positive integer (not a bool), else raise naming ``argument`` and ``what`` it is."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"Expected argument `{argument}` to be a positive integer but got {value!r}. Pass {what}, e.g. `{example}`."
        )
    return value


def _check_options(value: Any, kind: type, argument: str, example: str) -> Any:
    """``None``, an instance of ``kind``, or one made from a mapping of its fields (e.g. from a YAML config)."""
    if value is None or isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        try:
            return kind(**value)
        except TypeError as error:
            raise ConfigurationError(
                f"Expected argument `{argument}` to hold the fields of `{kind.__name__}` but got {dict(value)!r}"
                f" ({error}). Pass e.g. `{argument}={example}`."
            ) from None
    raise ConfigurationError(
        f"Expected argument `{argument}` to be a `{kind.__name__}`, a mapping of its fields, or None but got"
        f" {value!r:.80}. Pass e.g. `{argument}={example}`."
    )


def _check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"Expected argument `{argument}` to be a bool but got {value!r}. Pass True or False.")
    return value


def _check_names(value: Any, argument: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        return tuple(value)
    mapping = " or a mapping of names to state specs" if argument == "recurrent_modules" else ""
    raise ConfigurationError(
        f"Expected argument `{argument}` to be a list of submodule names{mapping} but got {value!r}. Pass e.g."
        f" `{argument}=['encoder.cell']`."
    )


def _check_specs(value: Any) -> tuple[tuple[str, ...], tuple[tuple[str, StateSpec], ...]]:
    """The names of ``recurrent_modules`` and the state spec given for each (a mapping of names to specs)."""
    if isinstance(value, Mapping):
        if not all(isinstance(name, str) for name in value):
            raise ConfigurationError(
                f"Expected the keys of `recurrent_modules` to be submodule names but got {list(value)!r}. Pass e.g."
                " `recurrent_modules={'encoder.layer': 'initial_state -> 1'}`."
            )
        return tuple(value), tuple((name, StateSpec.parse(spec, name)) for name, spec in value.items())
    return _check_names(value, "recurrent_modules"), ()


def _check_choice(value: Any, argument: str, choices: tuple[str, ...], hint: str) -> Any:
    if value not in choices:
        raise ConfigurationError(f"Expected argument `{argument}` to be one of {choices} but got {value!r}. {hint}")
    return value


def _check_non_negative_int(value: Any, argument: str, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"Expected argument `{argument}` to be a non-negative integer but got {value!r}. {hint}"
        )
    return value


def _probe_settings(
    segment_length: Any,
    every: Any,
    tolerance: Any,
    horizon: Any,
    shortest: Any,
    longest: Any,
) -> ProbeSettings | None:
    """Check the probe's arguments (see ``TBPTTCallback``); ``None`` without a probe."""
    auto = segment_length == "auto"
    if isinstance(segment_length, str) and not auto:
        raise ConfigurationError(
            f"Expected argument `segment_length` to be 'auto' or a positive integer but got {segment_length!r}. Pass"
            " e.g. `segment_length=64`, or `segment_length='auto'` to let the truncation probe choose it."
        )
    if not auto:
        for argument, value in (("min_segment_length", shortest), ("max_segment_length", longest)):
            if value is not None:
                raise ConfigurationError(
                    f"Expected argument `{argument}` to be set only with `segment_length='auto'` but got {value!r}"
                    f" with `segment_length={segment_length!r}`. Pass `segment_length='auto'`, or drop `{argument}`."
                )
    if every is None and not auto:
        for argument, value in (("probe_tolerance", tolerance), ("probe_horizon", horizon)):
            if value is not None:
                raise ConfigurationError(
                    f"Expected argument `{argument}` to be set only with a probe but got {value!r} without"
                    " `probe_every` (or `segment_length='auto'`). Pass e.g. `probe_every=50`, or drop"
                    f" `{argument}`."
                )
        return None
    if every is not None:
        check_positive_int(
            every,
            "probe_every",
            "TBPTTCallback(segment_length=64, probe_every=50)",
            "the training batches between probes",
        )
    if tolerance is not None and (
        isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1
    ):
        raise ConfigurationError(
            f"Expected argument `probe_tolerance` to be a number between 0 and 1 (exclusive) but got {tolerance!r}:"
            " it is the relative bias of the truncated gradient a segment length may have. Pass e.g."
            " `probe_tolerance=0.1`."
        )
    if horizon is not None:
        check_positive_int(
            horizon, "probe_horizon", "TBPTTCallback(segment_length=64, probe_horizon=256)", "the time steps to probe"
        )
    low = (
        8
        if shortest is None
        else check_positive_int(shortest, "min_segment_length", "min_segment_length=16", "a segment length")
    )
    high = (
        512
        if longest is None
        else check_positive_int(longest, "max_segment_length", "max_segment_length=512", "a segment length")
    )
    if horizon is not None:
        # the span must hold a cut of the length in use (fixed), or of the shortest length ("auto")
        shortest_cut, named = (low, f"`min_segment_length` ({low})") if auto else (segment_length, None)
        if isinstance(shortest_cut, int) and horizon <= shortest_cut:
            named = named or f"`segment_length` ({segment_length})"
            raise ConfigurationError(
                f"Expected argument `probe_horizon` to be longer than {named} but got {horizon}: the probe measures"
                f" the cuts of segments shorter than the steps it probes, so it would measure none. Pass e.g."
                f" `probe_horizon={4 * shortest_cut}` (the default is 4 times the segment length)."
            )
    if auto and high < low:
        raise ConfigurationError(
            f"Expected argument `max_segment_length` to be at least `min_segment_length={low}` but got {high}."
            " Pass bounds with `min_segment_length <= max_segment_length`, e.g. 16 and 512."
        )
    return ProbeSettings(
        every=20 if every is None else every,
        tolerance=0.1 if tolerance is None else float(tolerance),
        horizon=horizon,
        auto=auto,
        min_length=low,
        max_length=high,
    )


@dataclass(frozen=True)
class BatchLayout:
    """Where a batch holds time, the lengths of its sequences and its reset markers."""

    time_dim: int = 1
    lengths: FieldLocation | None = None
    resets: FieldLocation | None = None
    drop_finished: bool = False

    @property
    def has_fields(self) -> bool:
        """Whether the batch carries lengths or reset markers (the planner then reads and rewrites them)."""
        return self.lengths is not None or self.resets is not None


@dataclass(frozen=True)
class Settings:
    """Every setting of a ``TBPTTCallback``, checked (see :meth:`from_arguments`)."""

    geometry: Geometry
    layout: BatchLayout
    step_per: StepPer = "segment"
    exact: bool = False
    streaming: bool = False
    evaluate: bool = True
    transfer: Transfer | None = None
    log_every: LogEvery = "step"
    nonfinite_state: NonfiniteState = "keep"
    recurrent_modules: tuple[str, ...] = ()
    state_specs: tuple[tuple[str, StateSpec], ...] = ()
    """The state specs given in ``recurrent_modules`` (name, spec); the other modules follow the defaults."""
    exclude_modules: tuple[str, ...] = ()
    probe: ProbeSettings | None = None
    """The truncation probe (and ``segment_length="auto"``), or ``None``."""
    random_lengths: RandomLengths | None = None
    """How training segment lengths are drawn, or ``None`` (fixed)."""
    dynamic_eval: DynamicEvaluation | None = None
    """Dynamic evaluation, or ``None``."""

    @property
    def auto(self) -> bool:
        """Whether the probe chooses the segment length (``segment_length="auto"``)."""
        return self.probe is not None and self.probe.auto

    @classmethod
    def from_arguments(
        cls,
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
    ) -> "Settings":
        """Check the arguments of ``TBPTTCallback`` one by one, then the combinations refused at ``"init"``.

        Raises:
            ConfigurationError: If an argument is invalid, or a combination is refused.

        """
        probe = _probe_settings(
            segment_length, probe_every, probe_tolerance, probe_horizon, min_segment_length, max_segment_length
        )
        length: int | None = None
        if probe is not None and probe.auto:
            length = probe.longest  # where "auto" starts: the longest length, the least biased
        elif segment_length is not None:
            length = check_positive_int(segment_length, "segment_length", "TBPTTCallback(segment_length=64)")
        if stride is not None:
            check_positive_int(
                stride, "stride", "TBPTTCallback(segment_length=64, stride=16)", "the time steps between windows"
            )
        _check_choice(
            loss_on,
            "loss_on",
            LOSS_ON_CHOICES,
            "Use 'new' for the loss on each window's new steps (every step counted once) or 'window' for every step"
            " of a window.",
        )
        _check_non_negative_int(
            burn_in,
            "burn_in",
            "Pass the number of steps run without gradient before a batch's first window to refresh the state, e.g."
            " `burn_in=32`, or 0 for none.",
        )
        _check_non_negative_int(
            time_dim,
            "time_dim",
            "Pass 1 for batch-first sequences `(B, T, ...)` or 0 for time-first sequences `(T, B, ...)`.",
        )
        exact = _check_bool(exact, "exact")
        if step_per is None:
            step_per = "batch" if exact else "segment"
        _check_choice(
            step_per,
            "step_per",
            STEP_PER_CHOICES,
            "Use 'segment' for a step after every segment or 'batch' for one step per batch.",
        )
        _check_choice(
            log_every,
            "log_every",
            LOG_EVERY_CHOICES,
            "Use 'step' for a logger row per optimizer step or 'batch' for one row per batch, as Lightning does.",
        )
        _check_choice(
            nonfinite_state,
            "nonfinite_state",
            NONFINITE_STATE_CHOICES,
            "Use 'keep' to carry the state as it is or 'reset' to zero the rows whose state is not finite.",
        )
        if transfer is not None:
            _check_choice(
                transfer,
                "transfer",
                TRANSFER_CHOICES,
                "Use 'segment' to move one segment at a time to the device or 'batch' to let Lightning move whole"
                " batches.",
            )
        recurrent, specs = _check_specs(recurrent_modules)
        excluded = _check_names(exclude_modules, "exclude_modules")
        drop = _check_bool(drop_finished, "drop_finished")
        settings = cls(
            geometry=Geometry(length, stride, burn_in, loss_on),
            layout=BatchLayout(
                time_dim,
                None if lengths is None else FieldLocation(lengths),
                None if resets is None else FieldLocation(resets, argument="resets"),
                drop,
            ),
            step_per=step_per,
            exact=exact,
            streaming=_check_bool(streaming, "streaming"),
            evaluate=_check_bool(evaluate, "evaluate"),
            transfer=transfer,
            log_every=log_every,
            nonfinite_state=nonfinite_state,
            recurrent_modules=recurrent,
            state_specs=specs,
            exclude_modules=excluded,
            probe=probe,
            random_lengths=_check_options(random_lengths, RandomLengths, "random_lengths", "RandomLengths(seed=0)"),
            dynamic_eval=_check_options(dynamic_eval, DynamicEvaluation, "dynamic_eval", "DynamicEvaluation(lr=1e-4)"),
        )
        refuse("init", settings)
        return settings

    def for_fit(self, segment_length: int) -> "Settings":
        """These settings with the segment length a fit resolved."""
        return dataclasses.replace(self, geometry=self.geometry.resolved(segment_length))

    def as_set(self, argument: str) -> Any:
        """The value of ``argument`` if it changes what is run, else ``None``: for the refusals.

        ``stride`` counts only when windows overlap, ``burn_in`` only when positive, flags only when set.
        """
        geometry, layout = self.geometry, self.layout
        values: dict[str, Any] = {
            "lengths": None if layout.lengths is None else layout.lengths.spec,
            "resets": None if layout.resets is None else layout.resets.spec,
            "stride": geometry.stride if geometry.overlaps else None,
            "burn_in": geometry.burn_in or None,
            "drop_finished": layout.drop_finished or None,
            "streaming": self.streaming or None,
            "random_lengths": self.random_lengths,
        }
        return values[argument]

    def saved(self) -> dict[str, Any]:
        """The settings that decide what a resumed fit trains, as saved in checkpoints."""
        geometry = self.geometry
        return {
            "segment_length": "auto" if self.auto else geometry.length,
            "stride": geometry.effective_stride,
            "burn_in": geometry.burn_in,
            "step_per": self.step_per,
            "exact": self.exact,
            "time_dim": self.layout.time_dim,
            "loss_on": geometry.loss_on,
            "random_lengths": None if self.random_lengths is None else self.random_lengths.saved(),
        }


@dataclass(frozen=True)
class FitFacts:
    """What a fit's ``Trainer`` and ``LightningModule`` decide about the settings, gathered once in ``setup``."""

    module: str = "LightningModule"
    """The class name of the module."""
    segment_length: int = 0
    """The fit's segment length."""
    segment_length_from_module: bool = False
    """Whether it is the module's ``truncated_bptt_steps`` (Lightning 1.x style)."""
    callbacks: int = 1
    """The number of ``TBPTTCallback`` instances in ``Trainer(callbacks=...)``."""
    callback: str = "TBPTTCallback"
    """The class name of the callback (a subclass may override ``split_batch``)."""
    module_splits: bool = False
    """The module defines Lightning 1.x's ``tbptt_split_batch``."""
    callback_splits: bool = False
    """The callback's class overrides ``split_batch``."""
    fetches_batches: bool = False
    """``training_step`` takes a ``dataloader_iter``."""
    takes_hiddens: bool = False
    """``training_step`` is passed Lightning 1.x's ``hiddens`` (:func:`~lightning_tbptt.compat.hiddens_signature`)."""
    hiddens_position: int | None = None
    """The position of the ``hiddens`` parameter of ``training_step``, or ``None``."""
    expected_hiddens_position: int = 2
    """Where it must be: after ``batch`` and, if the step takes it, ``batch_idx``."""
    step_signature: str = "(batch, batch_idx)"
    automatic: bool = True
    """The module uses automatic optimization."""
    strategy: str = "Strategy"
    strategy_accumulates: bool = False
    """The strategy accumulates gradients itself (``Strategy.handles_gradient_accumulation``)."""

    @property
    def splitter(self) -> str | None:
        """The custom split that cuts the batches, or ``None``."""
        if self.module_splits:
            return "tbptt_split_batch"
        return "split_batch" if self.callback_splits else None


Condition = Callable[[Settings, FitFacts], bool]
Build = Callable[[Settings, FitFacts], TBPTTError]


@dataclass(frozen=True)
class Refusal:
    """One refused combination: at which stage it is checked, when it applies, and the error it raises."""

    name: str
    stage: Stage
    applies: Condition
    error: Build


def _with_custom_split(argument: str) -> Refusal:
    return Refusal(
        f"{argument} with a custom split",
        "setup",
        lambda s, f: f.splitter is not None and s.as_set(argument) is not None,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback({argument}={s.as_set(argument)!r})` cannot be combined with a custom `{f.splitter}`: the"
            f" start of its segments in the batch is unknown, so their {argument} are too. Drop one of the two."
        ),
    )


def _with_hiddens(argument: str) -> Refusal:
    return Refusal(
        f"{argument} with hiddens",
        "training",
        lambda s, f: f.hiddens_position is not None and s.as_set(argument) is not None,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback({argument}={s.as_set(argument)!r})` cannot work with `hiddens`, whose layout the callback"
            " does not know. Let the callback carry the RNN state (drop the `hiddens` argument of `training_step`),"
            f" or do not set `{argument}`."
        ),
    )


def _probing(settings: Settings) -> str:
    probe = settings.probe
    if probe is not None and probe.auto:
        return "`TBPTTCallback(segment_length='auto')`"
    return f"`TBPTTCallback(probe_every={None if probe is None else probe.every})`"


def _probe_refusal(argument: str) -> Refusal:
    return Refusal(
        f"probe with {argument}",
        "init",
        lambda s, f: s.probe is not None and s.as_set(argument) is not None,
        lambda s, f: ConfigurationError(
            f"{_probing(s)} cannot be combined with `{argument}={s.as_set(argument)!r}`: the probe measures the bias"
            " of consecutive segments from the batch's start, which is not what windows or a burn-in prefix train."
            f" Drop `{argument}`, or do not probe."
        ),
    )


REFUSALS: tuple[Refusal, ...] = (
    Refusal(
        "stride beyond segment_length",
        "init",
        lambda s, f: (
            s.geometry.segment_length is not None
            and s.geometry.stride is not None
            and s.geometry.stride > s.geometry.segment_length
        ),
        lambda s, f: ConfigurationError(
            f"Expected argument `stride` to be at most `segment_length={s.geometry.segment_length}` but got"
            f" {s.geometry.stride}: windows would leave steps between them untrained. Pass a stride between 1 and the"
            " segment length (equal to it for plain TBPTT)."
        ),
    ),
    Refusal(
        "drop_finished without lengths",
        "init",
        lambda s, f: s.layout.drop_finished and s.layout.lengths is None,
        lambda s, f: ConfigurationError(
            "Expected argument `lengths` to be set with `drop_finished=True` but got None: rows can only be"
            " dropped once their sequence is known to have ended. Pass e.g. `lengths='lengths'`."
        ),
    ),
    Refusal(
        "drop_finished with streaming",
        "init",
        lambda s, f: s.layout.drop_finished and s.streaming,
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(drop_finished=True)` cannot be combined with `streaming=True`: a dropped row's lane"
            " would have no state in the next batch. Use `drop_finished=False`; mark where a lane's next sequence"
            " starts with `resets`."
        ),
    ),
    Refusal(
        "exact with step_per='segment'",
        "init",
        lambda s, f: s.exact and s.step_per == "segment",
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(exact=True)` takes one optimizer step per batch, after the gradient through the whole"
            " batch is complete, but got `step_per='segment'`, a step after every segment. Leave `step_per` unset"
            " (or pass `step_per='batch'`), or use `exact=False` for truncated TBPTT."
        ),
    ),
    Refusal(
        "exact with stride",
        "init",
        lambda s, f: s.exact and s.geometry.overlaps,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(exact=True)` cannot be combined with `stride={s.geometry.stride}`: overlapping windows"
            " are a truncation scheme (each window restarts from a state with no gradient path), and `exact`"
            " backpropagates through the whole batch. Drop `stride`, or use `exact=False`."
        ),
    ),
    Refusal(
        "exact with burn_in",
        "init",
        lambda s, f: s.exact and bool(s.geometry.burn_in),
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(exact=True)` cannot be combined with `burn_in={s.geometry.burn_in}`: burn-in steps run"
            " without gradient, and `exact` backpropagates through every step of the batch. Drop `burn_in`, or use"
            " `exact=False`."
        ),
    ),
    Refusal(
        "exact with nonfinite_state='reset'",
        "init",
        lambda s, f: s.exact and s.nonfinite_state == "reset",
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(exact=True)` cannot be combined with `nonfinite_state='reset'`: a row whose state is not"
            " finite has a non-finite loss, and the exact gradient of the batch backpropagates it through every"
            " segment, so resetting the state would not keep the step finite. Use `nonfinite_state='keep'` (and"
            " e.g. gradient clipping, or a smaller learning rate), or `exact=False`."
        ),
    ),
    *(_probe_refusal(argument) for argument in ("stride", "burn_in")),
    Refusal(
        "auto with exact",
        "init",
        lambda s, f: s.auto and s.exact,
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(segment_length='auto')` cannot be combined with `exact=True`: the exact gradient has no"
            " truncation bias, so there is nothing for the probe to choose the segment length by (it only trades"
            " memory against time there). Pass a fixed `segment_length` with `exact=True`; `probe_every` still"
            " reports what truncation would cost."
        ),
    ),
    Refusal(
        "random_lengths with a probe",
        "init",
        lambda s, f: s.random_lengths is not None and s.probe is not None,
        lambda s, f: ConfigurationError(
            f"{_probing(s)} cannot be combined with `random_lengths`: the probe measures the bias of one fixed"
            f" segment length{' (and sets it)' if s.auto else ''}, while `random_lengths` draws a new length for every"
            f" segment. {'Pass a fixed `segment_length` with' if s.auto else 'Do not probe with'} `random_lengths`, or"
            " drop `random_lengths`."
        ),
    ),
    Refusal(
        "random_lengths scale_lr with step_per='batch'",
        "init",
        lambda s, f: s.random_lengths is not None and s.random_lengths.scale_lr and s.step_per == "batch",
        lambda s, f: ConfigurationError(
            "`RandomLengths(scale_lr=True)` scales the learning rate of each segment's optimizer step by its length,"
            f" but `TBPTTCallback(step_per='batch'{', exact=True' if s.exact else ''})` takes one step per batch, for"
            " all its segments. Use `scale_lr=False`, or `step_per='segment'`."
        ),
    ),
    Refusal(
        "random_lengths scale_lr with stride",
        "init",
        lambda s, f: s.random_lengths is not None and s.random_lengths.scale_lr and s.geometry.overlaps,
        lambda s, f: ConfigurationError(
            f"`RandomLengths(scale_lr=True)` cannot be combined with `stride={s.geometry.stride}`: a window's"
            " length is its overlap plus its drawn new steps, so AWD-LSTM's `length / bptt` has no single meaning"
            " there. Use `scale_lr=False` with windows (the new steps are still drawn), or drop `stride`."
        ),
    ),
    Refusal(
        "dynamic_eval with evaluate=False",
        "init",
        lambda s, f: s.dynamic_eval is not None and not s.evaluate,
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(dynamic_eval=...)` adapts the weights between the segments of an evaluation batch, but"
            " `evaluate=False` leaves evaluation to Lightning, uncut. Use `evaluate=True` (the default)."
        ),
    ),
    Refusal(
        "dynamic_eval rule='rms' with manual optimization",
        "setup",
        lambda s, f: s.dynamic_eval is not None and s.dynamic_eval.rule == "rms" and not f.automatic,
        lambda s, f: ConfigurationError(
            f"`DynamicEvaluation(rule='rms')` takes the gradients of `{f.module}.training_step`'s loss on training"
            " batches, but with manual optimization that step makes its own backward and optimizer steps. Use"
            " `rule='sgd'` (which adapts on the evaluation steps' losses only), or automatic optimization."
        ),
    ),
    Refusal(
        "several callbacks",
        "setup",
        lambda s, f: f.callbacks > 1,
        lambda s, f: ConfigurationError(
            f"Expected one `TBPTTCallback` in `Trainer(callbacks=...)` but got {f.callbacks}. Keep a single instance"
            " with the segment length and options you want."
        ),
    ),
    Refusal(
        "stride beyond the module's segment length",
        "setup",
        lambda s, f: (
            f.segment_length_from_module
            and f.segment_length > 0
            and s.geometry.stride is not None
            and s.geometry.stride > f.segment_length
        ),
        lambda s, f: ConfigurationError(
            f"Expected argument `stride` to be at most the segment length {f.segment_length} (the"
            f" `truncated_bptt_steps` of {f.module}) but got {s.geometry.stride}. Pass a stride between 1 and the"
            " segment length."
        ),
    ),
    Refusal(
        "two custom splits",
        "setup",
        lambda s, f: f.module_splits and f.callback_splits,
        lambda s, f: ConfigurationError(
            f"Both `{f.callback}.split_batch` and `{f.module}.tbptt_split_batch` are defined, so it is unclear which"
            " one cuts the batches. Keep only one of them."
        ),
    ),
    *(_with_custom_split(argument) for argument in ("lengths", "resets", "stride", "burn_in")),
    Refusal(
        "random_lengths with a custom split",
        "setup",
        lambda s, f: f.splitter is not None and s.random_lengths is not None,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(random_lengths=...)` cannot be combined with a custom `{f.splitter}`, which decides the"
            " segments itself. Draw the lengths in the custom split, or drop one of the two."
        ),
    ),
    Refusal(
        "probe with a custom split",
        "setup",
        lambda s, f: s.probe is not None and f.splitter is not None,
        lambda s, f: ConfigurationError(
            f"{_probing(s)} cannot be combined with a custom `{f.splitter}`: the probe cuts the batch into bands of"
            " its own, along `time_dim`, and a custom split's layout is unknown to it. Drop one of the two."
        ),
    ),
    Refusal(
        "training_step(dataloader_iter)",
        "training",
        lambda s, f: f.fetches_batches,
        lambda s, f: ModelError(
            f"`{f.module}.training_step(dataloader_iter)` fetches its own batches, so `TBPTTCallback` cannot cut"
            " them into segments. Take `training_step(batch, batch_idx)` instead."
        ),
    ),
    Refusal(
        "hiddens out of place",
        "training",
        lambda s, f: f.hiddens_position is not None and f.hiddens_position != f.expected_hiddens_position,
        lambda s, f: ModelError(
            f"Expected `{f.module}.training_step` to take `hiddens` as its argument after `batch` and `batch_idx` but"
            f" got `training_step{f.step_signature}`. Use `training_step(self, batch, batch_idx, hiddens)`."
        ),
    ),
    *(_with_hiddens(argument) for argument in ("drop_finished", "streaming", "resets", "stride", "burn_in")),
    Refusal(
        "exact with hiddens",
        "training",
        lambda s, f: s.exact and f.hiddens_position is not None,
        lambda s, f: ConfigurationError(
            "`TBPTTCallback(exact=True)` cannot work with Lightning 1.x `hiddens`: the state a segment starts from"
            " must be a leaf the callback makes and joins back to the segment before, and `hiddens` are threaded by"
            f" `{f.module}.training_step` itself, in a layout the callback does not know. Let the callback carry the"
            " state (drop the `hiddens` argument of `training_step`), or use `exact=False`."
        ),
    ),
    Refusal(
        "exact with manual optimization",
        "training",
        lambda s, f: s.exact and not f.automatic,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(exact=True)` cannot work with manual optimization: it runs every segment twice, the"
            f" second time through Lightning's automatic optimization, and `{f.module}.training_step` makes its own"
            " backward and optimizer steps. Use automatic optimization, or `exact=False`."
        ),
    ),
    Refusal(
        "probe with hiddens",
        "training",
        lambda s, f: s.probe is not None and f.hiddens_position is not None,
        lambda s, f: ConfigurationError(
            f"{_probing(s)} cannot work with Lightning 1.x `hiddens`: the probe starts each band from a state it"
            f" makes a leaf, and `hiddens` are threaded by `{f.module}.training_step` itself, in a layout the"
            " callback does not know. Let the callback carry the state (drop the `hiddens` argument of"
            " `training_step`), or do not probe."
        ),
    ),
    Refusal(
        "probe with manual optimization",
        "training",
        lambda s, f: s.probe is not None and not f.automatic,
        lambda s, f: ConfigurationError(
            f"{_probing(s)} cannot work with manual optimization: the probe runs `{f.module}.training_step` for its"
            " gradients only, and that step makes its own backward and optimizer steps. Use automatic"
            " optimization, or do not probe."
        ),
    ),
    Refusal(
        "burn_in with manual optimization",
        "training",
        lambda s, f: bool(s.geometry.burn_in) and not f.automatic,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(burn_in={s.geometry.burn_in})` cannot work with manual optimization: the burn-in steps"
            f" run `{f.module}.training_step` without gradient, and that step makes its own backward and optimizer"
            " steps. Use automatic optimization, or `burn_in=0`."
        ),
    ),
    Refusal(
        "step_per='batch' with a strategy that accumulates",
        "training",
        lambda s, f: s.step_per == "batch" and f.strategy_accumulates,
        lambda s, f: ConfigurationError(
            f"`TBPTTCallback(step_per='batch')` cannot work with the strategy {f.strategy}: it accumulates gradients"
            " itself and steps after every segment. Use `step_per='segment'` or another strategy."
        ),
    ),
)
"""Every combination refused, in the order checked."""


def refuse(stage: Stage, settings: Settings, facts: FitFacts | None = None) -> None:
    """Raise the error of the first refusal of :data:`REFUSALS` at ``stage`` that applies.

    Raises:
        ConfigurationError: Or ``ModelError`` (the module's step cannot work with the callback).

    """
    known = facts if facts is not None else FitFacts()
    for refusal in REFUSALS:
        if refusal.stage == stage and refusal.applies(settings, known):
            raise refusal.error(settings, known)
