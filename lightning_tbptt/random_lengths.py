"""Randomised segment lengths: cuts that move from batch to batch (AWD-LSTM's variable BPTT, a random first cut).

With fixed cuts the step at position ``i`` of a segment always gets ``i`` steps of history, and the steps just after
a cut never learn a long dependency in any epoch. :class:`RandomLengths` draws the length of each training segment
instead (the number of new steps of each window, with ``stride``), from a base ``k``: the segment length (or the
stride):

* ``rule="awd"`` (Merity et al. 2017): for every segment, a base of ``k`` with probability ``p`` and ``k / 2``
  otherwise, then the length ``max(minimum, int(gauss(base, std)))``;
* ``rule="offset"``: the first segment of a batch has a length drawn uniformly from ``1..k``, the others ``k``: the
  grid of cuts shifts by a random offset in every batch.

A drawn length is then rounded to the nearest of ``buckets`` when given (ties to the shorter), so that a
``torch.compile``-d model sees a few shapes only. Evaluation is not randomised.

The draws of a batch come from ``random.Random(f"{seed}:{epoch}:{batch}")`` (Python's generator, seeded by a string:
the same on every machine), where ``batch`` counts the training batches of the epoch from 0. So they do not touch
the global random number generators, every DDP process draws the same lengths, and a run resumed from a checkpoint
(which holds the epoch and the batches done) draws what the uninterrupted run drew.

``scale_lr=True`` (AWD's rule) multiplies the learning rate of every parameter group by ``length / k`` for the
optimizer step of each segment, and puts the exact value back afterwards (schedulers see their own values).

Example:
    >>> RandomLengths(seed=1).lengths(64, 200, epoch=0, batch=0)
    [63, 58, 60, 19]

"""

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Literal

from lightning_tbptt.errors import ConfigurationError

RandomRule = Literal["awd", "offset"]
RANDOM_RULES: tuple[RandomRule, ...] = ("awd", "offset")


@dataclass(frozen=True)
class RandomLengths:
    """How training segment lengths are drawn: ``TBPTTCallback(random_lengths=RandomLengths(...))``.

    Args:
        rule: ``"awd"`` or ``"offset"`` (see the module documentation).
        seed: Seeds the draws (with the epoch and the batch index).
        p: With ``"awd"``: the probability of the full base ``k`` (else ``k / 2``), in [0, 1].
        std: With ``"awd"``: the standard deviation of the length around its base (≥ 0).
        minimum: With ``"awd"``: the shortest length (≥ 1).
        buckets: Lengths to round every drawn length to (the nearest; ties to the shorter), or ``None``.
        scale_lr: Multiply the learning rate by ``length / k`` for each segment's optimizer step.

    """

    rule: RandomRule = "awd"
    seed: int = 0
    p: float = 0.95
    std: float = 5.0
    minimum: int = 5
    buckets: Sequence[int] | None = None
    scale_lr: bool = False

    def __post_init__(self) -> None:
        if self.rule not in RANDOM_RULES:
            raise ConfigurationError(
                f"Expected argument `rule` of `RandomLengths` to be one of {RANDOM_RULES} but got {self.rule!r}. Use"
                " 'awd' for AWD-LSTM's lengths around the segment length or 'offset' for a random first cut."
            )
        _check_int("seed", self.seed, 0, "Pass any integer ≥ 0")
        _check_int("minimum", self.minimum, 1, "Pass the shortest segment length to draw, e.g. 5")
        if not isinstance(self.p, (int, float)) or isinstance(self.p, bool) or not 0 <= self.p <= 1:
            raise ConfigurationError(
                f"Expected argument `p` of `RandomLengths` to be a probability in [0, 1] but got {self.p!r}. AWD-LSTM"
                " uses 0.95."
            )
        if not isinstance(self.std, (int, float)) or isinstance(self.std, bool) or not 0 <= self.std < float("inf"):
            raise ConfigurationError(
                f"Expected argument `std` of `RandomLengths` to be a finite number ≥ 0 but got {self.std!r}. AWD-LSTM"
                " uses 5."
            )
        if self.buckets is not None:
            buckets = tuple(self.buckets) if not isinstance(self.buckets, (str, bytes)) else ()
            if not buckets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets):
                raise ConfigurationError(
                    f"Expected argument `buckets` of `RandomLengths` to be a non-empty sequence of integers ≥ 1 but"
                    f" got {self.buckets!r}. Pass e.g. `buckets=(32, 48, 64, 80)`, or None."
                )
            object.__setattr__(self, "buckets", tuple(sorted(set(buckets))))
        if not isinstance(self.scale_lr, bool):
            raise ConfigurationError(
                f"Expected argument `scale_lr` of `RandomLengths` to be True or False but got {self.scale_lr!r}."
            )

    def new_steps(self, base: int, *, epoch: int, batch: int) -> Iterator[int]:
        """The lengths drawn for the segments of training batch ``batch`` of ``epoch``, in order (endless)."""
        generator = random.Random(f"{self.seed}:{epoch}:{batch}")
        if self.rule == "offset":
            return chain([self._bucketed(generator.randint(1, base))], repeat(self._bucketed(base)))
        return (self._awd(generator, base) for _ in repeat(None))

    def _awd(self, generator: random.Random, base: int) -> int:
        centre = base if generator.random() < self.p else base / 2
        return self._bucketed(max(self.minimum, int(generator.gauss(centre, self.std))))

    def _bucketed(self, length: int) -> int:
        if self.buckets is None:
            return length
        return min(self.buckets, key=lambda bucket: (abs(bucket - length), bucket))

    def lengths(self, base: int, length: int, *, epoch: int, batch: int) -> list[int]:
        """The segment lengths of a training batch of ``length`` steps (no stride, burn-in or padding)."""
        found: list[int] = []
        drawn = self.new_steps(base, epoch=epoch, batch=batch)
        while sum(found) < length:
            found.append(min(next(drawn), length - sum(found)))
        return found

    def saved(self) -> dict[str, object]:
        """The settings, for a checkpoint's record of the configuration."""
        buckets = None if self.buckets is None else list(self.buckets)
        return {"rule": self.rule, "seed": self.seed, "p": self.p, "std": self.std, "minimum": self.minimum,
                "buckets": buckets, "scale_lr": self.scale_lr}  # fmt: skip


def _check_int(name: str, value: object, low: int, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigurationError(
            f"Expected argument `{name}` of `RandomLengths` to be an integer ≥ {low} but got {value!r}. {hint}."
        )


@contextmanager
def scaled_learning_rates(optimizers: Iterable[Any], factor: float) -> Iterator[None]:
    """While active, the learning rate of every parameter group of ``optimizers`` is multiplied by ``factor``.

    The values before are put back exactly afterwards, also when the body raises.
    """
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    saved = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = group["lr"] * factor
    try:
        yield
    finally:
        for group, lr in zip(groups, saved, strict=True):
            group["lr"] = lr
