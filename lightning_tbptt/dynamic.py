"""Dynamic evaluation (Krause et al. 2018): evaluation that adapts the weights to the sequence it has just scored.

Evaluation is segmented with the state carried; dynamic evaluation also takes a gradient step after each segment is
scored, on that segment's loss, so the next segment is predicted by a model adapted to the recent past. Each segment's
loss (and everything ``validation_step`` logs for it) is computed *before* its update: no segment is scored by weights
that have seen it.

With gradients ``g`` of a segment's loss and the trained weights ``θ₀`` (those the evaluation run started with), each
parameter ``θ`` is updated after the segment, in place:

* ``rule="sgd"``: ``θ ← θ - lr·g + decay·(θ₀ - θ)``;
* ``rule="rms"`` (the paper's RMS-normalised rule with decay back to the trained weights):
  ``θ ← θ - lr·g / (√MS + eps) + decay·r·(θ₀ - θ)``, where ``MS`` is the mean of the squared gradients of
  ``training_step``'s loss over the segments of the first ``statistics_batches`` batches of ``statistics`` (computed
  at the start of each evaluation run, with the trained weights), and ``r = √MS / mean(√MS)`` (the mean over every
  entry of every parameter), clipped at ``1/decay``, so that parameters whose gradients are large on training data
  decay faster.

The trained weights are kept at the first batch of each evaluation run (each dataloader of a run starts from them
again) and copied back, bitwise, after each dataloader's last batch (when its length is unknown, when the run ends)
and when the run raises; the gradients are taken with :func:`torch.autograd.grad`, so the
parameters' ``.grad`` and the training optimizer (its state, its learning rates) are never touched.

Example:
    >>> DynamicEvaluation(lr=1e-4, rule="rms", decay=2e-3, statistics=[])
    DynamicEvaluation(lr=0.0001, rule='rms', decay=0.002, eps=2e-05, stages=('validate', 'test', 'predict'), ...)

"""

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_tbptt.errors import ConfigurationError, ModelError

Rule = Literal["sgd", "rms"]
RULES: tuple[Rule, ...] = ("sgd", "rms")
STAGES = ("validate", "test", "predict")


@dataclass(frozen=True, repr=False)
class DynamicEvaluation:
    """The settings of dynamic evaluation: ``TBPTTCallback(dynamic_eval=DynamicEvaluation(...))``.

    Args:
        lr: The step size ``lr`` of the update (> 0).
        rule: ``"sgd"`` or ``"rms"`` (see the module documentation).
        decay: ``λ ≥ 0``, the pull back towards the trained weights per update (0: none).
        eps: Added to ``√MS`` in the ``"rms"`` rule (> 0).
        stages: The evaluations that adapt: any of ``"validate"`` (also the validation inside ``fit`` and its sanity
            check), ``"test"`` and ``"predict"``.
        loss: ``loss(output, segment_batch) -> Tensor``: the loss to adapt on, from what the step returned for a
            segment. ``None``: the step's output itself when it is a tensor, or its ``"loss"`` entry (so
            ``validation_step`` and ``test_step`` must return their loss). Needed for ``"predict"``.
        statistics: With ``rule="rms"`` (needed there): the training batches for ``MS``, an iterable (e.g. a
            ``DataLoader``) or a callable that returns one (called at the start of each evaluation run). A loader of
            its own rather than the fit's: the fit's training loader may be in the middle of an epoch.
        statistics_batches: With ``rule="rms"``: how many batches of ``statistics`` to take (≥ 1).

    """

    lr: float
    rule: Rule = "sgd"
    decay: float = 0.0
    eps: float = 2e-5
    stages: Sequence[str] = STAGES
    loss: Callable[[Any, Any], Tensor] | None = None
    statistics: Iterable[Any] | Callable[[], Iterable[Any]] | None = None
    statistics_batches: int = 16

    def __post_init__(self) -> None:
        _check_number("lr", self.lr, positive=True, hint="The paper's values are about 1e-5 to 1e-3 (rms) or 1e-4 to 1")
        _check_number("decay", self.decay, positive=False, hint="Pass 0 for no decay towards the trained weights")
        _check_number("eps", self.eps, positive=True, hint="The default is 2e-5")
        if self.rule not in RULES:
            raise ConfigurationError(
                f"Expected argument `rule` of `DynamicEvaluation` to be one of {RULES} but got {self.rule!r}. Use"
                " 'sgd' for plain gradient steps or 'rms' for steps normalised by training gradients' RMS."
            )
        stages = (self.stages,) if isinstance(self.stages, str) else tuple(self.stages)
        wrong = [stage for stage in stages if stage not in STAGES]
        if wrong or not stages:
            raise ConfigurationError(
                f"Expected argument `stages` of `DynamicEvaluation` to name some of {STAGES} but got"
                f" {self.stages!r}. Pass e.g. `stages=('test',)` to adapt in `trainer.test` only."
            )
        object.__setattr__(self, "stages", stages)
        if self.loss is not None and not callable(self.loss):
            raise ConfigurationError(
                f"Expected argument `loss` of `DynamicEvaluation` to be a callable `loss(output, segment_batch)` or"
                f" None but got {self.loss!r:.80}."
            )
        statistics = self.statistics
        if statistics is not None and not (callable(statistics) or isinstance(statistics, Iterable)):
            raise ConfigurationError(
                f"Expected argument `statistics` of `DynamicEvaluation` to be an iterable of training batches (e.g. a"
                f" `DataLoader`), a callable that returns one, or None but got {statistics!r:.80}."
            )
        if self.rule == "rms" and self.statistics is None:
            raise ConfigurationError(
                "Expected argument `statistics` of `DynamicEvaluation(rule='rms')` to give training batches for the"
                " gradient statistics but got None. Pass e.g. `statistics=train_loader`, or a callable that returns a"
                " fresh training loader (not the one the fit is iterating)."
            )
        if (
            not isinstance(self.statistics_batches, int)
            or isinstance(self.statistics_batches, bool)
            or self.statistics_batches < 1
        ):
            raise ConfigurationError(
                f"Expected argument `statistics_batches` of `DynamicEvaluation` to be an integer ≥ 1 but got"
                f" {self.statistics_batches!r}. Pass how many training batches the 'rms' rule's statistics take."
            )

    def __repr__(self) -> str:
        return (
            f"DynamicEvaluation(lr={self.lr!r}, rule={self.rule!r}, decay={self.decay!r}, eps={self.eps!r},"
            f" stages={self.stages!r}, ...)"
        )

    def saved(self) -> dict[str, Any]:
        """The numeric settings, for a checkpoint's record of the configuration."""
        return {"lr": self.lr, "rule": self.rule, "decay": self.decay, "eps": self.eps, "stages": list(self.stages)}


def _check_number(name: str, value: Any, *, positive: bool, hint: str) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else "≥ 0"
        raise ConfigurationError(
            f"Expected argument `{name}` of `DynamicEvaluation` to be a finite number {bound} but got {value!r}."
            f" {hint}."
        )


def adaptation_loss(settings: DynamicEvaluation, output: Any, batch: Any, step: str) -> Tensor:
    """The loss a segment adapts on: ``settings.loss(output, batch)``, or the step's returned loss."""
    if settings.loss is not None:
        loss = settings.loss(output, batch)
        where = "`DynamicEvaluation(loss=...)`"
    else:
        loss = output["loss"] if isinstance(output, dict) and "loss" in output else output
        where = f"`{step}`"
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        if isinstance(loss, Tensor):
            got = f"a tensor of shape {tuple(loss.shape)}"
        elif isinstance(loss, dict):
            got = f"a dict without 'loss' (keys {sorted(map(str, loss))})"
        else:
            got = type(loss).__name__
        fix = (
            "Pass `DynamicEvaluation(loss=lambda output, batch: ...)`, which computes the loss from the predictions"
            if step == "predict_step" and settings.loss is None
            else f"Return the segment's loss from `{step}` (a tensor, or a dict with 'loss'), or pass"
            " `DynamicEvaluation(loss=lambda output, batch: ...)`"
        )
        raise ModelError(
            f"Dynamic evaluation adapts on the loss of each segment: expected {where} to give a scalar loss tensor but"
            f" got {got}. {fix}."
        )
    return loss


class Adapter:
    """The adaptation of one evaluation run: the trained weights, the ``"rms"`` statistics, the updates."""

    def __init__(self, settings: DynamicEvaluation, parameters: Sequence[Tensor]) -> None:
        self.settings = settings
        self.parameters = [p for p in parameters if p.requires_grad]
        self.trained = [p.detach().clone() for p in self.parameters]
        self.scales: list[Tensor] | None = None
        """With ``"rms"``: ``√MS + eps`` per parameter."""
        self.rates: list[Tensor] | None = None
        """With ``"rms"``: the decay rates ``r`` per parameter, clipped at ``1/decay``."""
        self.adapted = False
        """Whether the parameters differ from the trained weights (an update since the last :meth:`restore`)."""

    def set_statistics(self, squared_sums: Sequence[Tensor], count: int) -> None:
        """``MS`` from the sums of squared gradients over ``count`` segments."""
        if count == 0:
            raise ModelError(
                "The 'rms' rule of dynamic evaluation needs training gradients but no training segment was run for"
                " its statistics. Give `DynamicEvaluation(statistics=...)` batches with time steps."
            )
        roots = [torch.sqrt(total / count) for total in squared_sums]
        mean = torch.cat([root.flatten() for root in roots]).mean()
        self.scales = [root + self.settings.eps for root in roots]
        decay = self.settings.decay
        rates = [root / mean if float(mean) > 0 else torch.ones_like(root) for root in roots]
        self.rates = [rate.clamp(max=1 / decay) for rate in rates] if decay > 0 else rates

    def step(self, loss: Tensor) -> None:
        """Adapt the weights on ``loss`` (of the segment just scored)."""
        if not loss.requires_grad:
            raise ModelError(
                "Dynamic evaluation adapts on each segment's loss, but the loss has no gradient: the step computed it"
                " without autograd (e.g. under `torch.no_grad()`) or from no trainable parameter. Compute the loss"
                " from the model's output without detaching it."
            )
        grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        settings = self.settings
        self.adapted = True
        with torch.no_grad():
            for index, (parameter, grad, trained) in enumerate(zip(self.parameters, grads, self.trained, strict=True)):
                pull = None
                if settings.decay:  # from the weights before this update
                    rate = self.rates[index] if self.rates is not None else 1.0
                    pull = settings.decay * rate * (trained - parameter)
                if grad is not None:
                    scaled = grad / self.scales[index] if self.scales is not None else grad
                    parameter.sub_(settings.lr * scaled)
                if pull is not None:
                    parameter.add_(pull)

    def restore(self) -> None:
        """Copy the trained weights back (bitwise), if an update changed them since they were last put back."""
        if not self.adapted:
            return
        with torch.no_grad():
            for parameter, trained in zip(self.parameters, self.trained, strict=True):
                parameter.copy_(trained)
        self.adapted = False
