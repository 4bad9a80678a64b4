"""The one module that touches Lightning's private training loop.

Lightning 2.x has no public way to run one batch as several optimisation steps, so for the duration of a fit the
library replaces, on the loop *instances* of one ``Trainer`` (never on classes), the few methods that decide how a
batch is run, and removes them afterwards. Private names used, unchanged in pytorch-lightning 2.1.0 → 2.6.x:

* ``Trainer.fit_loop.epoch_loop`` — the ``_TrainingEpochLoop``;
* ``_TrainingEpochLoop.automatic_optimization`` — ``_AutomaticOptimization``, and its
  ``run(optimizer, batch_idx, kwargs)``, ``_make_zero_grad_fn(batch_idx, optimizer)``, ``_skip_backward``,
  ``_on_before_zero_grad(optimizer)``, ``_optimizer_zero_grad(batch_idx, optimizer)`` and the zeroing counters
  ``optim_progress.optimizer.zero_grad`` (``increment_ready()``, ``increment_started()``, ``increment_completed()``),
  which the dispatch-free zeroing advances as those two methods do (see *Fast paths* below);
* ``_TrainingEpochLoop.manual_optimization`` — ``_ManualOptimization``, and its ``run(kwargs)``;
* ``_TrainingEpochLoop._should_accumulate()``;
* ``Trainer._results.batch_size`` — the batch size by which ``self.log(..., on_epoch=True)`` weights a value; set per
  segment to its number of valid time steps, and back to ``None`` (Lightning infers it from the batch) afterwards;
* ``Trainer.fit_loop.epoch_loop.batch_progress`` (``current.processed``, ``current.completed``,
  ``increment_completed()``) — corrected on resume before Lightning 2.5 (:func:`complete_batch_saved_at_batch_end`),
  and read, with ``Trainer.fit_loop.epoch_progress`` (``current.ready``, ``current.started``, ``current.processed``),
  for the batches of the epoch in progress that a checkpoint taken now has trained (:func:`batches_done_in_epoch`),
  which :class:`~lightning_tbptt.data.LaneDataModule`'s training loader saves and resumes from;
* ``<namespace>.trainer.call._call_strategy_hook(trainer, "training_step", ...)`` — how Lightning calls
  ``training_step`` (the hook name that ``self.log`` checks, the profiler); used for burn-in steps, which run
  ``training_step`` outside the optimisation path;
* ``Trainer._logger_connector._first_loop_iter`` — during the first batch of an epoch, Lightning clears a hook's logged
  values each time it logs (harmless when every hook runs once per batch). With several segments per batch that would
  drop the first batch's earlier segments from epoch aggregates, so it is turned off once the first segment has run;
* ``Trainer._logger_connector.log_metrics(metrics, step=None)``, ``update_train_step_metrics()`` and ``metrics`` —
  with ``TBPTTCallback(log_every="step")`` the training rows go to the loggers after optimizer steps rather than at
  batch end, and every row the connector sends without a step of its own is put at ``global_step`` (by setting
  ``_TrainingEpochLoop._batches_that_stepped``, the step Lightning reads, for the duration of the call) instead of at
  the count of batches (:class:`StepLogging`);
* ``_TrainingEpochLoop.max_steps`` — ``Trainer(fast_dev_run=N)`` sets it to ``N``, which would stop a batch of several
  segments after ``N`` optimizer steps; while the fit runs it is ``-1``, so the ``N`` batches that ``fast_dev_run``
  limits the epoch to run whole (:class:`FastDevRunPatch`);
* ``Trainer._run_stage()`` — what runs the sanity check and the training, evaluation or prediction loop; wrapped so
  that the library's patches are removed when it raises, before Lightning calls any ``on_exception`` hook (one that
  raises would stop the others, the library's among them) (:class:`ReleaseOnError`);
* ``Precision._after_closure(model, optimizer)`` and ``Precision._clip_gradients`` — the first shadowed on the precision
  plugin's instance (with the public ``pre_backward`` and ``post_backward``), the second only compared with Lightning's
  own (see *Fast paths*);
* ``LightningModule._apply_batch_transfer_handler`` and ``_call_batch_hook`` — only compared with Lightning's own (an
  override of either turns the dispatch-free transfer off);
* ``Trainer.validate_loop``, ``Trainer.test_loop`` and ``Trainer.predict_loop``, and their ``inference_mode`` flag —
  with ``TBPTTCallback(dynamic_eval=...)`` set to ``False`` for the duration of a fit or evaluation, so that these
  loops run under ``torch.no_grad()`` (inside which autograd can be enabled again) rather than
  ``torch.inference_mode()`` (whose tensors no gradient can go through); the validation inside ``fit`` already runs
  without inference mode (:class:`GradientsInEvaluation`);
* ``<namespace>.trainer.call``'s logger — Lightning logs every hook call it dispatches at ``DEBUG``; while it is enabled
  the fast paths stay off, so such a log is the same as without them;
* ``LightningModule._compiler_ctx`` — set by Lightning for a module passed to ``fit`` as ``torch.compile(module)``;
  its ``log``/``log_dict`` are then shadowed by versions that ``torch.compile`` does not trace (a graph break), since
  tracing them fails (:class:`EagerLogging`).

Public methods of the ``Strategy`` instance, shadowed by instance attributes in the same way (:class:`StrategyPatch`):

* ``Strategy.batch_to_device(batch, device=None, dataloader_idx=0)`` — the loops call it once per batch, before the
  step; while a segmented loop runs it returns the batch as it is (on the host), and each segment is moved to the
  device by the original method right before it runs (so ``transfer_batch_to_device`` and ``on_after_batch_transfer``
  run once per segment);
* ``Strategy.validation_step``, ``test_step``, ``predict_step`` — each runs once per segment of an evaluation batch.

Instance attributes of the ``LightningModule``, shadowed while one segment runs and restored afterwards:

* ``log`` and ``log_dict`` — do nothing while a burn-in segment runs (:func:`silenced_logging`);
* ``training_step`` — replaced by a zero loss while a process takes part in an optimizer step for which it has no
  segment (DDP with batches of different lengths, :func:`shadowed_training_step`), and wrapped while a segment is
  recomputed with ``exact=True``, so that its loss is joined to the gradient of the segments after it
  (:func:`returned_through`).

And the dict ``Trainer.progress_bar_metrics`` returns, which is the logger connector's own (it keeps the values shown
until Lightning resets them): the truncation probe's values are added to it, so that the progress bar shows them
without going through ``self.log`` outside a hook (:func:`show_in_progress_bar`).

And one public global of ``lightning_utilities``, for the duration of a fit: ``rank_zero.log`` and
``rank_zero.rank_zero_deprecation_category``, which the namespace imported last points at itself, point at the fit's
namespace and are put back afterwards (:class:`RankZeroLogging`).

Calling the original ``run`` once per segment gives every segment Lightning's whole automatic-optimisation path
(precision plugin, gradient clipping, ``optimizer_step`` and every backward/optimizer hook). Whether a segment zeroes
the gradients and whether it steps are decided per segment by overriding the two per-batch decisions
(``_make_zero_grad_fn`` and ``_should_accumulate``) while the segment runs; between segments Lightning's own per-batch
answers stand.

Fast paths (``FAST_PATHS``). Lightning dispatches every hook through ``trainer.call`` (a debug log line, the profiler,
``LightningModule._current_fx_name`` set and restored through ``nn.Module.__setattr__``), a few microseconds each, paid
per segment. These per-segment round trips are replaced, decided once per batch, only while nothing could tell the
difference: the ``Trainer``'s profiler is Lightning's ``PassThroughProfiler`` (it records nothing), the debug log of
hook calls is off, and every hook involved is Lightning's own default function, unchanged on the class and the instance:

* zeroing (:meth:`TrainingLoopPatch._make_zero_grad_fn`): when no callback overrides ``on_before_zero_grad`` and the
  module overrides neither ``on_before_zero_grad`` nor ``optimizer_zero_grad``, the segment calls
  ``optimizer.zero_grad()`` itself (what the default ``optimizer_zero_grad`` does) and advances the zeroing counters as
  Lightning does; the no-op default hooks are not called;
* the hooks around backward and the optimizer step (``Precision.pre_backward``, ``post_backward`` and
  ``_after_closure``, shadowed on the precision plugin's instance where its class keeps Lightning's own): when neither
  the module nor a callback overrides ``on_before_backward``, ``on_after_backward`` or ``on_before_optimizer_step``,
  their no-op defaults are not dispatched; the clipping that follows ``on_before_optimizer_step`` is skipped with it
  only when ``Trainer(gradient_clip_val=...)`` is unset and neither ``configure_gradient_clipping`` nor
  ``clip_gradients`` is overridden (on the module, or on the precision plugin's class; Lightning's default then clips
  nothing);
* moving a segment (:meth:`StrategyPatch.to_device`): when the strategy's class keeps ``Strategy.batch_to_device`` and
  neither the module nor the datamodule overrides ``transfer_batch_to_device`` or ``on_after_batch_transfer`` (nor the
  module ``_apply_batch_transfer_handler``/``_call_batch_hook``), Lightning's default ``transfer_batch_to_device`` and
  ``on_after_batch_transfer`` functions are called directly, with the arguments Lightning passes them; and when every
  object of the batch with a ``to`` method is a tensor already on the device (training on the CPU), nothing is called
  at all: ``tensor.to(device)`` would return the tensor itself (:meth:`StrategyPatch.moves`);
* no row for the loggers is collected after an optimizer step when the ``Trainer`` has no logger
  (:meth:`StepLogging.flush`).

Anything overridden, by the user, a callback or the strategy, takes Lightning's own path, hook for hook
(``tests/test_hook_calls.py``).
"""

import importlib
import logging
from abc import ABC
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning_utilities.core.rank_zero as rank_zero
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from packaging.version import Version
from torch.optim import Optimizer

from lightning_tbptt.errors import ConfigurationError
from lightning_tbptt.namespaces import NAMESPACES, lightning_version, namespace_of
from lightning_tbptt.schedule import Decision

if TYPE_CHECKING:
    import pytorch_lightning as pl


def resume_reruns_last_batch(trainer: "pl.Trainer") -> bool:
    """Whether ``trainer`` resumes a checkpoint saved in ``on_train_batch_end`` by running that batch index again.

    Before 2.5.0 the saved batch progress counts the batch as not completed (Lightning issue #18060): resuming runs its
    index again and, at the last batch of an epoch, runs one more batch of that epoch.
    """
    return lightning_version(trainer) < Version("2.5.0")


_REQUIRED = {
    "fit_loop": ("epoch_loop", "epoch_progress"),
    "epoch_loop": (
        "automatic_optimization",
        "manual_optimization",
        "_should_accumulate",
        "_batches_that_stepped",
        "max_steps",
        "batch_progress",
    ),
    "automatic_optimization": (
        "run",
        "_make_zero_grad_fn",
        "_skip_backward",
        "_on_before_zero_grad",
        "_optimizer_zero_grad",
        "optim_progress",
    ),
    "manual_optimization": ("run",),
    "trainer": ("_results", "_logger_connector", "_run_stage"),
    "precision": ("pre_backward", "post_backward", "_after_closure"),
    "logger_connector": ("_first_loop_iter", "log_metrics", "update_train_step_metrics", "metrics"),
}


def _owners(trainer: "pl.Trainer") -> dict[str, Any]:
    fit_loop = getattr(trainer, "fit_loop", None)
    epoch_loop = getattr(fit_loop, "epoch_loop", None)
    return {
        "fit_loop": fit_loop,
        "epoch_loop": epoch_loop,
        "automatic_optimization": getattr(epoch_loop, "automatic_optimization", None),
        "manual_optimization": getattr(epoch_loop, "manual_optimization", None),
        "trainer": trainer,
        "logger_connector": getattr(trainer, "_logger_connector", None),
        "precision": getattr(getattr(trainer, "strategy", None), "precision_plugin", None),
    }


def check_supported(trainer: "pl.Trainer", required: dict[str, tuple[str, ...]]) -> None:
    """Raise ``ConfigurationError`` if the loop objects of ``trainer`` lack a name of ``required`` (by owner)."""
    objects = _owners(trainer)
    for owner, names in required.items():
        missing = [name for name in names if not hasattr(objects[owner], name)]
        if missing:
            raise ConfigurationError(
                f"Expected Lightning 2.1 to 2.6 but got version {lightning_version(trainer)}, whose training loop"
                f" has no `{owner}.{missing[0]}`. Install a supported release, e.g."
                " `pip install 'pytorch-lightning>=2.1,<2.7'` (or `lightning`)."
            )


FAST_PATHS = True
"""Whether the dispatch-free paths of the module docstring may be taken. ``False`` runs every segment through
Lightning's own dispatch (the tests and ``benchmarks/overhead.py --compare-paths`` compare the two)."""


def _is_default(obj: Any, name: str, base: Any) -> bool:
    """Whether ``obj.name`` is ``base``'s own function ``name``: not overridden on ``obj``'s class nor its instance."""
    if name in getattr(obj, "__dict__", ()):
        return False
    default = getattr(base, name, None)
    return default is not None and getattr(getattr(obj, name, None), "__func__", None) is default


class _Defaults:
    """What the fast paths compare with, for the namespace of one ``Trainer``."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        namespace = namespace_of(trainer)
        self.module = namespace.LightningModule
        self.datamodule = namespace.LightningDataModule
        self.strategy = importlib.import_module(f"{namespace.__name__}.strategies").Strategy
        self.profiler = importlib.import_module(f"{namespace.__name__}.profilers").PassThroughProfiler
        self.precision = importlib.import_module(f"{namespace.__name__}.plugins.precision").Precision
        self.callbacks = tuple(each.Callback for each in NAMESPACES)
        self._log = logging.getLogger(f"{namespace.__name__}.trainer.call")
        self._trainer = trainer

    def unobserved(self) -> bool:
        """Whether skipping Lightning's dispatch of a default hook is invisible: no profiler, no debug log of calls."""
        profiler = self._trainer.profiler  # type: ignore[attr-defined]
        return FAST_PATHS and type(profiler) is self.profiler and not self._log.isEnabledFor(logging.DEBUG)

    def callback_hook(self, name: str) -> bool:
        """Whether no callback of the ``Trainer`` overrides the hook ``name`` (all defaults do nothing)."""
        callbacks: list[Any] = self._trainer.callbacks  # type: ignore[attr-defined]
        bases = self.callbacks
        return all(any(_is_default(callback, name, base) for base in bases) for callback in callbacks)


@dataclass
class BatchContext:
    """What the training loop knows about the batch about to be run."""

    kwargs: "OrderedDict[str, Any]"
    """The arguments of ``training_step`` in order (``batch`` and, if the step takes it, ``batch_idx``)."""
    automatic: bool
    """Whether the module uses automatic optimization (``False``: the module steps its optimizers itself)."""
    accumulate_grad_batches: int = 1
    """The ``Trainer``'s current value (callbacks such as ``GradientAccumulationScheduler`` change it per epoch)."""
    batch_zeroes: bool = False
    """Lightning's per-batch rule: the gradients are zeroed for this batch."""
    batch_steps: bool = False
    """Lightning's per-batch rule: the optimizer steps after this batch."""
    skip_backward: bool = False
    """Lightning runs no backward in this epoch (e.g. the BatchNorm update epoch of ``StochasticWeightAveraging``)."""


RunSegment = Callable[["OrderedDict[str, Any]", Decision | None, int], dict[str, Any]]
"""Runs one segment: its ``training_step`` arguments, its decision (``None`` in manual optimization) and the weight
of the values it logs (its number of valid time steps)."""
RunBatch = Callable[[BatchContext, RunSegment], dict[str, Any]]


class TrainingLoopPatch:
    """Makes the training loop of one ``Trainer`` run each batch through ``run_batch``.

    Args:
        trainer: The trainer whose loop instances are patched.
        run_batch: Called once per training batch with the batch context and a function that runs one segment
            through Lightning's own optimisation path (given the segment's ``training_step`` arguments and, in
            automatic optimization, the segment's :class:`~lightning_tbptt.schedule.Decision`).

    """

    def __init__(self, trainer: "pl.Trainer", run_batch: RunBatch, step_logging: "StepLogging | None" = None) -> None:
        check_supported(trainer, _REQUIRED)
        epoch_loop = trainer.fit_loop.epoch_loop
        self._trainer = trainer
        self._epoch_loop = epoch_loop
        self._automatic = epoch_loop.automatic_optimization
        self._manual = epoch_loop.manual_optimization
        self._run_batch = run_batch
        self._step_logging = step_logging
        self._decision: Decision | None = None
        self._defaults = _Defaults(trainer)
        self._zeroing_by_default = False
        self._precision = trainer.strategy.precision_plugin
        self._default_hooks: frozenset[str] = frozenset()
        """The hooks whose dispatch the running batch's segments skip (see *Fast paths*), decided per batch."""
        shadows = {
            "pre_backward": self._pre_backward,
            "post_backward": self._post_backward,
            "_after_closure": self._after_closure,
        }
        self._patches = (
            (self._automatic, "run", self._run_automatic),
            (self._automatic, "_make_zero_grad_fn", self._make_zero_grad_fn),
            (self._manual, "run", self._run_manual),
            (self._epoch_loop, "_should_accumulate", self._should_accumulate),
            # only where the precision plugin's class keeps Lightning's own method (a subclass's is left alone)
            *(
                (self._precision, name, shadow)
                for name, shadow in shadows.items()
                if getattr(type(self._precision), name, None) is getattr(self._defaults.precision, name)
            ),
        )

    def install(self) -> None:
        """Install the patches as instance attributes of the loop objects."""
        for owner, name, function in self._patches:
            setattr(owner, name, function)
        if self._step_logging is not None:
            self._step_logging.install()

    def remove(self) -> None:
        """Remove the patches; the loop objects fall back to their class methods. Safe to call more than once."""
        for owner, name, function in self._patches:
            if vars(owner).get(name) == function:
                delattr(owner, name)
        if self._step_logging is not None:
            self._step_logging.remove()
        self._decision = None

    @property
    def installed(self) -> bool:
        """Whether the patches are in place."""
        return any(vars(owner).get(name) == function for owner, name, function in self._patches)

    def _class_method(self, owner: object, name: str) -> Callable[..., Any]:
        return getattr(type(owner), name).__get__(owner)

    def _run_automatic(self, optimizer: Optimizer, batch_idx: int, kwargs: "OrderedDict[str, Any]") -> dict[str, Any]:
        original_run = self._class_method(self._automatic, "run")
        accumulate = self._trainer.accumulate_grad_batches
        context = BatchContext(
            kwargs=kwargs,
            automatic=True,
            accumulate_grad_batches=accumulate,
            batch_zeroes=batch_idx % accumulate == 0,
            batch_steps=not self._class_method(self._epoch_loop, "_should_accumulate")(),
            skip_backward=self._automatic._skip_backward,
        )
        results = self._trainer._results  # the training loop's, one object for the whole fit: looked up once a batch
        self._zeroing_by_default = self._default_zeroing()  # what a segment's zeroing dispatches: decided per batch
        self._default_hooks = self._hooks_by_default()

        def run_segment(segment_kwargs: "OrderedDict[str, Any]", decision: Decision | None, weight: int) -> Any:
            self._decision = decision
            steps = self._before_segment(weight, results)
            try:
                return original_run(optimizer, batch_idx, segment_kwargs)
            finally:
                self._decision = None
                self._after_segment(steps, results)

        return self._run_batch(context, run_segment)

    def _run_manual(self, kwargs: "OrderedDict[str, Any]") -> dict[str, Any]:
        original_run = self._class_method(self._manual, "run")
        context = BatchContext(kwargs=kwargs, automatic=False)
        results = self._trainer._results

        def run_segment(segment_kwargs: "OrderedDict[str, Any]", decision: Decision | None, weight: int) -> Any:
            steps = self._before_segment(weight, results)
            try:
                return original_run(segment_kwargs)
            finally:
                self._after_segment(steps, results)

        return self._run_batch(context, run_segment)

    def _before_segment(self, weight: int, results: Any) -> int:
        """Weight the segment's logged values (``results``: ``Trainer._results``); return the optimizer steps so far."""
        if self._step_logging is not None:
            self._step_logging.flush()  # the row owed for the previous segment's step
        if results is not None:  # as `set_log_weight`, without resolving the active loop's results twice a segment
            results.batch_size = weight
        return self._trainer.global_step

    def _after_segment(self, steps_before: int, results: Any) -> None:
        if results is not None:
            results.batch_size = None
        connector = self._trainer._logger_connector
        if connector._first_loop_iter is True:
            connector._first_loop_iter = False
        if self._step_logging is not None:
            self._step_logging.segment_ran(steps_before)

    def _make_zero_grad_fn(self, batch_idx: int, optimizer: Optimizer) -> Callable[[], None] | None:
        decision = self._decision
        automatic = self._automatic
        if decision is None:
            return self._class_method(automatic, "_make_zero_grad_fn")(batch_idx, optimizer)
        if automatic._skip_backward or not decision.zero_grad:
            return None
        if self._zeroing_by_default:
            counters = automatic.optim_progress.optimizer.zero_grad

            def plain_zero_grad_fn() -> None:
                # Lightning's `_on_before_zero_grad` and `_optimizer_zero_grad` less the dispatch of default hooks
                counters.increment_ready()
                counters.increment_started()
                optimizer.zero_grad()  # the default `optimizer_zero_grad`
                counters.increment_completed()

            return plain_zero_grad_fn

        def zero_grad_fn() -> None:
            automatic._on_before_zero_grad(optimizer)
            automatic._optimizer_zero_grad(batch_idx, optimizer)

        return zero_grad_fn

    def _default_zeroing(self) -> bool:
        """Whether zeroing would only dispatch default hooks: ``on_before_zero_grad`` and ``optimizer_zero_grad``."""
        defaults = self._defaults
        module = self._trainer.lightning_module
        return (
            defaults.unobserved()
            and _is_default(module, "on_before_zero_grad", defaults.module)
            and _is_default(module, "optimizer_zero_grad", defaults.module)
            and defaults.callback_hook("on_before_zero_grad")
        )

    def _hooks_by_default(self) -> frozenset[str]:
        """The hooks around backward and the optimizer step that would only dispatch Lightning's no-op defaults."""
        defaults = self._defaults
        if not defaults.unobserved():
            return frozenset()
        module = self._trainer.lightning_module
        found = {
            name
            for name in ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
            if _is_default(module, name, defaults.module) and defaults.callback_hook(name)
        }
        no_clipping = (
            not self._trainer.gradient_clip_val
            and _is_default(module, "configure_gradient_clipping", defaults.module)
            and _is_default(module, "clip_gradients", defaults.module)
            and getattr(type(self._precision), "_clip_gradients", None) is defaults.precision._clip_gradients
            and getattr(type(self._precision), "clip_gradients", None) is defaults.precision.clip_gradients
        )
        if no_clipping:  # the default clipping with no clip value clips nothing (`Precision.clip_gradients`)
            found.add("configure_gradient_clipping")
        return frozenset(found)

    def _pre_backward(self, tensor: Any, module: Any) -> Any:
        if self._decision is not None and "on_before_backward" in self._default_hooks:
            return tensor  # `Precision.pre_backward` less the dispatch of the default hooks
        return self._class_method(self._precision, "pre_backward")(tensor, module)

    def _post_backward(self, tensor: Any, module: Any) -> Any:
        if self._decision is not None and "on_after_backward" in self._default_hooks:
            return tensor.detach()  # `Precision.post_backward` less the dispatch of the default hooks
        return self._class_method(self._precision, "post_backward")(tensor, module)

    def _after_closure(self, model: Any, optimizer: Any) -> None:
        skipped = {"on_before_optimizer_step", "configure_gradient_clipping"}
        if self._decision is not None and skipped <= self._default_hooks:
            return  # `Precision._after_closure` less the dispatch of the default hooks, which do nothing
        self._class_method(self._precision, "_after_closure")(model, optimizer)

    def _should_accumulate(self) -> bool:
        if self._decision is None:
            return self._class_method(self._epoch_loop, "_should_accumulate")()
        return not self._decision.step


class StepLogging:
    """Training rows go to the loggers after the optimizer steps they belong to, at ``global_step``.

    Lightning sends the ``on_step`` values logged during a batch to the loggers once, at the end of the batch, at the
    count of batches that stepped. Instead, after each optimizer step whose number ``global_step`` is a multiple of
    ``Trainer(log_every_n_steps=n)`` (and after the last step, where Lightning logs before stopping), a row goes out.
    The row of a batch's last segment waits for the end of the batch, so values logged in ``on_train_batch_end`` are
    in it, as they are in Lightning's own row. Every row the connector sends without a step of its own (these, and the
    epoch-level and validation rows) is put at ``global_step - 1``, the index of the latest optimizer step: where
    Lightning puts each of them when a batch takes one optimizer step.
    """

    def __init__(self, trainer: "pl.Trainer") -> None:
        self._trainer = trainer
        self._connector = trainer._logger_connector
        self._epoch_loop = trainer.fit_loop.epoch_loop
        self._owed: int | None = None
        """The ``global_step`` after the step whose row has not been sent yet (``global_step`` has not moved since)."""
        self._last_step: int | None = None
        """The ``global_step`` after the batch's last step, if its last segment stepped."""
        self._patches = (
            ("log_metrics", self._log_metrics),
            ("update_train_step_metrics", self._update_train_step_metrics),
        )

    def install(self) -> None:
        """Shadow the connector's methods on its instance."""
        self._owed = self._last_step = None
        for name, function in self._patches:
            setattr(self._connector, name, function)

    def remove(self) -> None:
        """Remove the shadows. Safe to call more than once."""
        for name, function in self._patches:
            if vars(self._connector).get(name) == function:
                delattr(self._connector, name)
        self._owed = self._last_step = None

    def _original(self, name: str) -> Callable[..., Any]:
        return getattr(type(self._connector), name).__get__(self._connector)

    def _at(self, step: int, metrics: Any) -> None:
        """Send ``metrics`` through Lightning's own ``log_metrics``, at ``step`` unless a ``step`` value is logged."""
        loop = self._epoch_loop
        counted = loop._batches_that_stepped
        loop._batches_that_stepped = step
        try:
            self._original("log_metrics")(metrics)
        finally:
            loop._batches_that_stepped = counted

    def _log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if step is not None:
            self._original("log_metrics")(metrics, step)
        else:
            self._at(max(self._trainer.global_step - 1, 0), metrics)

    def segment_ran(self, steps_before: int) -> None:
        """After a segment: owe a row if it took an optimizer step to log."""
        steps = self._trainer.global_step
        self._last_step = steps if steps > steps_before else None
        every = self._trainer.log_every_n_steps  # type: ignore[attr-defined]
        if self._last_step is not None and every > 0 and steps // every > steps_before // every:
            self._owed = steps

    def flush(self) -> None:
        """Send the row owed, if any.

        Without loggers there is nowhere to send it: Lightning's ``log_metrics`` would return at once, so the row's
        values are not even collected.
        """
        if self._owed is not None:
            self._owed = None
            if self._trainer.loggers:
                self._log_metrics(self._connector.metrics["log"])

    def _update_train_step_metrics(self) -> None:
        # at the end of a batch: the row of its last step (Lightning also logs the last step before stopping)
        trainer = self._trainer
        if self._owed is None and self._last_step is not None and (trainer.should_stop or trainer.fast_dev_run):  # type: ignore[attr-defined]
            self._owed = self._last_step
        self.flush()
        self._last_step = None


class FastDevRunPatch:
    """Lets ``Trainer(fast_dev_run=N)`` run ``N`` whole batches (Lightning would stop after ``N`` optimizer steps)."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self._trainer = trainer
        self._epoch_loop = trainer.fit_loop.epoch_loop
        self._saved: int | None = None

    def install(self) -> None:
        """Lift the step limit that ``fast_dev_run`` set (the batch limit it set stays)."""
        if self._trainer.fast_dev_run and self._saved is None:  # type: ignore[attr-defined]
            self._saved = self._epoch_loop.max_steps
            self._epoch_loop.max_steps = -1

    def remove(self) -> None:
        """Put the step limit back. Safe to call more than once."""
        if self._saved is not None:
            self._epoch_loop.max_steps = self._saved
            self._saved = None


class GradientsInEvaluation:
    """Runs ``validate``, ``test`` and ``predict`` under ``torch.no_grad()`` instead of ``torch.inference_mode()``.

    Dynamic evaluation takes gradients between evaluation segments, which tensors made in inference mode (the
    batches, the metrics' states) cannot take part in.
    """

    def __init__(self, trainer: "pl.Trainer") -> None:
        self._loops: list[Any] = [trainer.validate_loop, trainer.test_loop, trainer.predict_loop]
        self._saved: list[bool] | None = None

    def install(self) -> None:
        """Turn inference mode off in the three loops."""
        if self._saved is None:
            self._saved = [loop.inference_mode for loop in self._loops]
            for loop in self._loops:
                loop.inference_mode = False

    def remove(self) -> None:
        """Put each loop's flag back. Safe to call more than once."""
        if self._saved is not None:
            for loop, saved in zip(self._loops, self._saved, strict=True):
                loop.inference_mode = saved
            self._saved = None


class ReleaseOnError:
    """Calls ``release`` when the stage the ``Trainer`` runs (sanity check, loops) raises, before ``on_exception``.

    Lightning calls every callback's ``on_exception`` in turn, so one that raises keeps the later ones from running;
    the library's patches must not depend on its own ``on_exception``.
    """

    def __init__(self, trainer: "pl.Trainer", release: Callable[[], None]) -> None:
        self._trainer = trainer
        self._release = release

    def install(self) -> None:
        """Wrap the ``Trainer``'s ``_run_stage`` (an instance attribute)."""
        setattr(self._trainer, "_run_stage", self._run_stage)  # noqa: B010

    def remove(self) -> None:
        """Remove the wrapper. Safe to call more than once."""
        if vars(self._trainer).get("_run_stage") == self._run_stage:
            delattr(self._trainer, "_run_stage")

    def _run_stage(self) -> Any:
        run_stage = type(self._trainer)._run_stage.__get__(self._trainer)
        try:
            return run_stage()
        except BaseException:
            self.remove()
            self._release()
            raise


class EagerLogging:
    """Runs ``self.log``/``self.log_dict`` outside ``torch.compile``'s graph, for a module passed to ``fit`` compiled.

    Lightning compiles the step methods of ``torch.compile(module)``; tracing ``LightningModule.log`` fails in torch
    2.13 (``InternalTorchDynamoError`` on the ``inspect`` call it makes), in Lightning without the library too. The
    shadows are ``torch.compiler.disable`` versions of the two methods: a graph break, then the method runs eagerly.
    """

    NAMES = ("log", "log_dict")

    def __init__(self, module: "pl.LightningModule") -> None:
        self._module = module
        self._shadows: dict[str, Callable[..., Any]] = {}

    def install(self) -> None:
        """Shadow the methods on the module instance, if Lightning compiled it."""
        if getattr(self._module, "_compiler_ctx", None) is None or self._shadows:
            return
        for name in self.NAMES:
            if name not in vars(self._module):
                self._shadows[name] = torch.compiler.disable(getattr(self._module, name))
                setattr(self._module, name, self._shadows[name])

    def remove(self) -> None:
        """Remove the shadows. Safe to call more than once."""
        for name, shadow in self._shadows.items():
            if vars(self._module).get(name) is shadow:
                delattr(self._module, name)
        self._shadows.clear()


def complete_batch_saved_at_batch_end(trainer: "pl.Trainer") -> bool:
    """Count as completed a batch whose checkpoint was saved in ``on_train_batch_end`` (before Lightning 2.5).

    Such a checkpoint holds ``fit_loop.epoch_loop.batch_progress`` with the batch processed but not completed, so
    Lightning before 2.5 would run that batch index again; 2.5 does this same correction itself. Returns whether it
    applied.
    """
    progress = trainer.fit_loop.epoch_loop.batch_progress
    current: Any = progress.current  # a `_ProcessedTracker`, typed as its base class
    if current.processed != current.completed + 1:
        return False
    progress.increment_completed()
    return True


def batches_started_in_epoch(trainer: "pl.Trainer") -> int:
    """The batches of the current epoch the training loop has started, as restored from a checkpoint."""
    current: Any = trainer.fit_loop.epoch_loop.batch_progress.current
    return int(current.processed)


def batches_done_in_epoch(trainer: "pl.Trainer") -> int:
    """The batches of the training epoch in progress that a checkpoint taken now has trained; 0 between epochs.

    Read from the loop's progress, so it is the same whether the checkpoint is taken at the end of a batch, after a
    validation run in the middle of the epoch or (a batch interrupted) inside a batch, and, read on resume before the
    loop runs, it is what the checkpoint being resumed holds. An epoch that ended, also one that ``max_steps``
    stopped early, counts as finished: none of it is in progress.
    """
    check_supported(trainer, {"fit_loop": ("epoch_loop", "epoch_progress"), "epoch_loop": ("batch_progress",)})
    epoch: Any = trainer.fit_loop.epoch_progress.current
    if epoch.ready == epoch.processed and epoch.started == epoch.processed:
        return 0
    return batches_started_in_epoch(trainer)


def call_training_step(trainer: "pl.Trainer", kwargs: "OrderedDict[str, Any]", *, logged: bool = False) -> Any:
    """Call ``training_step`` with ``kwargs`` as Lightning's closure does, but outside any optimisation.

    ``logged``: its ``self.log`` values are kept, like a segment's (so the first batch of an epoch stops clearing them
    afterwards, see ``_first_loop_iter`` above).
    """
    call = importlib.import_module(f"{namespace_of(trainer).__name__}.trainer.call")
    output = call._call_strategy_hook(trainer, "training_step", *kwargs.values())
    if logged:
        connector = trainer._logger_connector
        if connector._first_loop_iter is True:
            connector._first_loop_iter = False
    return output


def set_log_weight(trainer: "pl.Trainer", weight: int | None) -> None:
    """Weight the values logged from now on with ``on_epoch=True`` by ``weight`` (``None``: Lightning's batch size)."""
    results = trainer._results
    if results is not None:
        results.batch_size = weight


class _Movable(ABC):  # noqa: B024  # a virtual base class: only its subclass hook matters
    """What Lightning's default ``transfer_batch_to_device`` moves: any object with a ``to`` method.

    As Lightning's own ``_TransferableDataType``; collections without a ``to`` method are gone into.
    """

    @classmethod
    def __subclasshook__(cls, subclass: Any) -> Any:
        return True if callable(getattr(subclass, "to", None)) else NotImplemented


def _movable(batch: Any) -> list[Any]:
    """Every object of a (nested) batch that Lightning's default transfer would call ``to`` on."""
    found: list[Any] = []
    apply_to_collection(batch, _Movable, found.append)
    return found


EVALUATION_STEPS = ("validation_step", "test_step", "predict_step")

RunEvaluation = Callable[[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
"""Runs one evaluation batch: the step's name, the original strategy step, and the step's arguments."""


class StrategyPatch:
    """Keeps batches on the host until their segments run, and runs evaluation steps through ``run_evaluation``.

    Args:
        trainer: The trainer whose strategy instance is patched.
        keep_on_host: Called when the loop moves a batch to the device: ``True`` leaves it on the host (the segments
            are moved one at a time with :meth:`to_device`).
        run_evaluation: Runs one evaluation batch; ``None`` leaves the evaluation steps alone.

    """

    def __init__(
        self,
        trainer: "pl.Trainer",
        keep_on_host: Callable[[], bool],
        run_evaluation: RunEvaluation | None,
    ) -> None:
        self._strategy = trainer.strategy
        self._trainer = trainer
        self._defaults = _Defaults(trainer)
        self._keep_on_host = keep_on_host
        self._run_evaluation = run_evaluation
        self.dataloader_idx = 0
        """The index of the dataloader of the last batch the loop asked to move."""
        self._patches: list[tuple[str, Callable[..., Any]]] = [("batch_to_device", self._batch_to_device)]
        if run_evaluation is not None:
            self._patches += [(name, self._evaluation_step(name)) for name in EVALUATION_STEPS]

    def install(self) -> None:
        """Install the patches as instance attributes of the strategy."""
        for name, function in self._patches:
            setattr(self._strategy, name, function)

    def remove(self) -> None:
        """Remove the patches; the strategy falls back to its class methods. Safe to call more than once."""
        for name, function in self._patches:
            if vars(self._strategy).get(name) == function:
                delattr(self._strategy, name)

    def _original(self, name: str) -> Callable[..., Any]:
        return getattr(type(self._strategy), name).__get__(self._strategy)

    def to_device(self, batch: Any) -> Any:
        """Move ``batch`` (a segment) to the device through the strategy and the module's transfer hooks."""
        module = self._strategy.lightning_module
        if module is not None and self._default_transfer(module):
            # what `Strategy.batch_to_device` runs, less the dispatch: the two default hooks, with its arguments
            defaults = self._defaults.module
            device = self._strategy.root_device
            batch = defaults.transfer_batch_to_device(module, batch, device, self.dataloader_idx)
            return defaults.on_after_batch_transfer(module, batch, self.dataloader_idx)
        return self._original("batch_to_device")(batch, dataloader_idx=self.dataloader_idx)

    def moves(self, batch: Any) -> bool:
        """Whether moving the segments of ``batch`` (on the host) to the device can change anything.

        ``False`` only when the transfer would run nothing but Lightning's default hooks (see :meth:`to_device`) and
        every object of the batch that has a ``to`` method (what Lightning's default ``transfer_batch_to_device``
        calls) is a tensor already on the root device: ``tensor.to(device)`` then returns the tensor itself, and the
        segments, cut from the batch's tensors, are on that device too. Decided once per batch.
        """
        module = self._strategy.lightning_module
        if module is None or not self._default_transfer(module):
            return True
        device = self._strategy.root_device
        return not all(isinstance(leaf, torch.Tensor) and leaf.device == device for leaf in _movable(batch))

    def _default_transfer(self, module: Any) -> bool:
        """Whether moving a segment would only dispatch Lightning's default transfer hooks."""
        defaults = self._defaults
        if not defaults.unobserved() or getattr(type(self._strategy), "batch_to_device", None) is not getattr(
            defaults.strategy, "batch_to_device", None
        ):
            return False
        names = ("transfer_batch_to_device", "on_after_batch_transfer")
        if not all(_is_default(module, name, defaults.module) for name in (*names, "_apply_batch_transfer_handler")):
            return False
        if not _is_default(module, "_call_batch_hook", defaults.module):
            return False
        datamodule = getattr(self._trainer, "datamodule", None)
        return datamodule is None or all(_is_default(datamodule, name, defaults.datamodule) for name in names)

    def _batch_to_device(self, batch: Any, device: Any = None, dataloader_idx: int = 0) -> Any:
        self.dataloader_idx = dataloader_idx
        if device is None and self._keep_on_host():
            return batch
        return self._original("batch_to_device")(batch, device, dataloader_idx)

    def _evaluation_step(self, name: str) -> Callable[..., Any]:
        assert self._run_evaluation is not None
        run = self._run_evaluation

        def step(*args: Any, **kwargs: Any) -> Any:
            return run(name, self._original(name), args, kwargs)

        return step


def patched_loop_attributes(trainer: "pl.Trainer") -> list[str]:
    """Return the loop and strategy methods shadowed on the instances of ``trainer`` (empty when none is)."""
    owners = _owners(trainer)
    loops = [
        f"{owner}.{name}"
        for owner, names in _REQUIRED.items()
        for name in names
        if callable(vars(owners[owner]).get(name))
    ]
    strategy = vars(trainer.strategy)
    names = ("batch_to_device", *EVALUATION_STEPS)
    return loops + [f"strategy.{name}" for name in names if callable(strategy.get(name))]


@contextmanager
def weighted_logging(trainer: "pl.Trainer", weight: int) -> Iterator[None]:
    """While active, the values logged with ``on_epoch=True`` are weighted by ``weight`` (:func:`set_log_weight`)."""
    set_log_weight(trainer, weight)
    try:
        yield
    finally:
        set_log_weight(trainer, None)


@contextmanager
def _shadowed(module: Any, replacements: dict[str, Callable[..., Any]]) -> Iterator[None]:
    shadowed = vars(module)
    previous = {name: shadowed.get(name) for name in replacements}
    shadowed.update(replacements)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del shadowed[name]
            else:
                shadowed[name] = value


def silenced_logging(module: Any) -> Any:
    """While active, ``self.log``/``self.log_dict`` of ``module`` do nothing (while a burn-in segment runs).

    Its values (a loss over no valid step may be NaN) must reach no log, whatever their weight or reduction.
    """

    def ignore(*args: Any, **kwargs: Any) -> None:
        return None

    return _shadowed(module, {"log": ignore, "log_dict": ignore})


def shadowed_training_step(module: Any, step: Callable[..., Any]) -> Any:
    """While active, ``module.training_step`` is ``step`` (shadowed on the instance, restored afterwards)."""
    return _shadowed(module, {"training_step": step})


def returned_through(
    module: Any, change: Callable[[Any], Any], around: Callable[[Callable[[], Any]], Any] = lambda call: call()
) -> Any:
    """While active, ``module.training_step`` runs through ``around`` and its output passes through ``change``.

    Shadowed on the instance, then restored (:func:`shadowed_training_step`).
    """
    original = module.training_step

    def step(*args: Any, **kwargs: Any) -> Any:
        return change(around(lambda: original(*args, **kwargs)))

    return shadowed_training_step(module, step)


class RankZeroLogging:
    """Points Lightning's shared rank-zero logger and deprecation category at the namespace of ``trainer``, for a fit.

    Both namespaces log through one ``lightning_utilities`` logger, which the namespace imported last points at itself:
    while installed, a fit logs (and warns) in its own namespace, where the user's logging configuration applies;
    :meth:`remove` puts back what was there.
    """

    def __init__(self, trainer: "pl.Trainer") -> None:
        name = namespace_of(trainer).__name__
        self._values: dict[str, Any] = {"log": logging.getLogger(f"{name}.utilities.rank_zero")}
        fabric = "lightning_fabric" if name == "pytorch_lightning" else "lightning.fabric"
        category = getattr(
            importlib.import_module(f"{fabric}.utilities.rank_zero"), "LightningDeprecationWarning", None
        )
        if category is not None:
            self._values["rank_zero_deprecation_category"] = category
        self._previous: dict[str, Any] | None = None

    def install(self) -> None:
        if self._previous is None:
            self._previous = {name: getattr(rank_zero, name, None) for name in self._values}
        for name, value in self._values.items():
            setattr(rank_zero, name, value)

    def remove(self) -> None:
        previous, self._previous = self._previous, None
        for name, value in (previous or {}).items():
            if getattr(rank_zero, name, None) is self._values[name] and value is not None:
                setattr(rank_zero, name, value)


def show_in_progress_bar(trainer: "pl.Trainer", values: dict[str, float]) -> None:
    """Show ``values`` in the progress bar until they are logged again (or Lightning resets its metrics)."""
    shown = trainer.progress_bar_metrics
    if isinstance(shown, dict):
        shown.update(values)
