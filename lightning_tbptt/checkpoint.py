"""The callback's entry in a checkpoint (:class:`CheckpointRecord`), and what it must hold to be resumed from.

:class:`CheckpointRecord` is where the training epoch stands after a batch and what the training stream carries then;
:meth:`CheckpointRecord.to_dict` writes the entry, :meth:`CheckpointRecord.from_dict` reads one back, refusing an
entry of a newer format and checking it first (:func:`check_entry`).

``TBPTTCallback.state_dict`` writes every key of :data:`COUNTS` and :data:`FLAGS` (release 0.1.0 all of them, without ``version``
and ``config``); with ``streaming=True`` also ``lanes``, ``carried`` and ``unfinished``; between two optimizer steps
``gradients``. An entry that lacks one, holds a value of another type, or a carried state that does not fit the
model's recurrent modules was edited or written by other code, and resuming from it would silently train something
else (or fail deep inside torch): it is refused with a message that names the key, what it holds and what it should.

Example:
    >>> check_entry({"epoch": 0, "batches_done": -1})
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.ConfigurationError: Expected the checkpoint's `TBPTTCallback` entry to hold `batches_done` as an integer >= 0 (it holds -1); `accumulated` as an integer >= 0 (it has none); `world_size` as an integer >= 1 (it has none); `mid_epoch` as True or False (it has none); `partial` as True or False (it has none); `in_batch` as True or False (it has none); `streaming` as True or False (it has none); `gathered` as True or False (it has none). It was edited or written by other code: resume from a checkpoint as `Trainer.save_checkpoint` wrote it, or delete the entry from `checkpoint['callbacks']` to resume without the callback's state.

"""  # noqa: E501

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_tbptt.errors import ConfigurationError

CHECKPOINT_FORMAT = 1
"""The version of the callback's entry in checkpoints; an entry of a newer version is refused."""
COUNTS = {"epoch": 0, "batches_done": 0, "accumulated": 0, "world_size": 1}
"""The integer keys of every entry, each with its least value."""
FLAGS = ("mid_epoch", "partial", "in_batch", "streaming", "gathered")
"""The True-or-False keys of every entry."""

_FIX = (
    "It was edited or written by other code: resume from a checkpoint as `Trainer.save_checkpoint` wrote it, or delete"
    " the entry from `checkpoint['callbacks']` to resume without the callback's state."
)


def _holds(entry: Mapping[str, Any], key: str) -> str:
    return f"it holds {_shown(entry[key])}" if key in entry else "it has none"


def _shown(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_state(value: Any) -> bool:
    """A tensor, or a tuple or list of states (``None`` inside: a part a custom module leaves out)."""
    if isinstance(value, Tensor):
        return True
    return isinstance(value, (tuple, list)) and all(item is None or _is_state(item) for item in value)


def check_entry(entry: Any) -> None:
    """Refuse an entry that does not hold every key ``state_dict`` writes, each of its type.

    Raises:
        ConfigurationError: Naming every key that is missing or holds another type, and what it holds.

    """
    if not isinstance(entry, Mapping):
        raise ConfigurationError(
            f"Expected the checkpoint's `TBPTTCallback` entry to be a dict but it holds {_shown(entry)}. {_FIX}"
        )
    problems: list[str] = []
    for key, least in COUNTS.items():
        value = entry.get(key)
        if not _is_int(value) or value < least:
            problems.append(f"`{key}` as an integer >= {least} ({_holds(entry, key)})")
    problems += [
        f"`{key}` as True or False ({_holds(entry, key)})" for key in FLAGS if not isinstance(entry.get(key), bool)
    ]
    if entry.get("streaming") is True:
        lanes, carried, unfinished = entry.get("lanes"), entry.get("carried"), entry.get("unfinished")
        if "lanes" not in entry or not (lanes is None or (_is_int(lanes) and lanes >= 1)):
            problems.append(f"`lanes` as None or an integer >= 1 ({_holds(entry, 'lanes')})")
        if not isinstance(carried, Mapping) or not all(
            isinstance(name, str) and _is_state(state) for name, state in carried.items()
        ):
            problems.append(
                "`carried` as a dict of module names to states (tensors, or tuples of them)"
                f" ({_holds(entry, 'carried')})"
            )
        if "unfinished" not in entry or not (unfinished is None or isinstance(unfinished, Tensor)):
            problems.append(f"`unfinished` as None or a tensor ({_holds(entry, 'unfinished')})")
    gradients = entry.get("gradients")
    if gradients is not None and not (
        isinstance(gradients, Mapping) and all(isinstance(g, Tensor) for g in gradients.values())
    ):
        problems.append(f"`gradients` as None or a dict of parameter names to tensors ({_holds(entry, 'gradients')})")
    probe = entry.get("probe")
    if probe is not None and not (
        isinstance(probe, Mapping)
        and set(probe) == {"batches", "segment_length"}
        and _is_int(probe["batches"])
        and probe["batches"] >= 0
        and _is_int(probe["segment_length"])
        and probe["segment_length"] >= 1
    ):
        problems.append(
            "`probe` as None or a dict of `batches` (an integer >= 0) and `segment_length` (an integer >= 1)"
            f" ({_holds(entry, 'probe')})"
        )
    if problems:
        raise ConfigurationError(
            f"Expected the checkpoint's `TBPTTCallback` entry to hold {'; '.join(problems)}. {_FIX}"
        )


def _expected_state(module: nn.Module) -> tuple[int, int] | None:
    """``(tensors, dimensions of each)`` of the state a ``torch.nn`` recurrent module takes; ``None`` for others."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        return 2, 3 if isinstance(module, nn.LSTM) else 2
    if isinstance(module, nn.RNNBase):
        return 1, 3
    if isinstance(module, nn.RNNCellBase):
        return 1, 2
    return None


def check_carried(carried: Mapping[str, Any], modules: Mapping[str, nn.Module]) -> None:
    """Refuse a carried state (this process's) that does not have the form its ``torch.nn`` recurrent module takes.

    Raises:
        ConfigurationError: Naming the module, the form it takes and what the checkpoint holds.

    """
    for name, state in carried.items():
        module = modules.get(name)
        expected = None if module is None else _expected_state(module)
        if expected is None:
            continue
        count, dims = expected
        tensors = [state] if count == 1 else list(state) if isinstance(state, (tuple, list)) else []
        if len(tensors) != count or not all(isinstance(t, Tensor) and t.dim() == dims for t in tensors):
            form = "a tensor" if count == 1 else f"a tuple of {count} tensors"
            shapes = (
                [tuple(t.shape) if isinstance(t, Tensor) else _shown(t) for t in state]
                if isinstance(state, (tuple, list))
                else _shown(state)
            )
            raise ConfigurationError(
                f"Expected the checkpoint's carried state of `{name}` ({type(module).__name__}) to be {form} of"
                f" {dims} dimensions but it holds {shapes}. {_FIX}"
            )


@dataclass
class CheckpointRecord:
    """Where the training epoch stands after a batch, and what the training stream carries then.

    Kept up to date by the fit after every training batch (and on resume); what a checkpoint taken then must hold to
    resume exactly. With several processes, a record read from a checkpoint holds every process's tensors (each with
    a leading dimension indexed by rank) until :meth:`for_process` takes one process's part.
    """

    epoch: int = 0
    batches_done: int = 0
    mid_epoch: bool = False
    accumulated: int = 0
    """Segments (or batches) accumulated towards the next optimizer step."""
    partial: bool = False
    """``max_steps`` stopped the last batch before its last segment."""
    in_batch: bool = False
    """Set while a batch runs: a checkpoint taken then holds parameters from the middle of the batch."""
    streaming: bool = False
    world_size: int = 1
    gathered: bool = False
    """Whether the tensors were gathered from every process."""
    pending_gradients: bool = False
    """Whether the parameters' gradients are accumulated towards an optimizer step that has not happened yet (the
    entry then holds them, as ``gradients``)."""
    config: dict[str, Any] | None = None
    """The settings that decide what a resumed fit trains (``None`` in release 0.1.0's entries)."""
    gradients: dict[str, Tensor] | None = None
    gradients_present: Tensor | None = None
    """Gathered: ``(processes, parameters)`` flags, the parameters of ``gradients`` that process had a gradient for."""
    lanes: int | None = None
    carried: dict[str, Any] = field(default_factory=dict)
    unfinished: Tensor | None = None
    probe: dict[str, int] | None = None
    """With a truncation probe: ``{"batches": ..., "segment_length": ...}``, the training batches the fit has run
    (the probe's schedule counts them) and the segment length in use (``"auto"`` changes it); ``None`` without one."""
    version: int = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The entry written into checkpoints."""
        entry: dict[str, Any] = {
            "version": self.version,
            "config": self.config,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "mid_epoch": self.mid_epoch,
            "accumulated": self.accumulated,
            "partial": self.partial,
            "in_batch": self.in_batch,
            "streaming": self.streaming,
            "world_size": self.world_size,
            "gathered": self.gathered,
        }
        if self.gradients is not None:
            entry["gradients"] = self.gradients
        if self.gradients_present is not None:
            entry["gradients_present"] = self.gradients_present
        if self.probe is not None:
            entry["probe"] = dict(self.probe)
        if self.streaming:
            entry["lanes"] = self.lanes
            entry["carried"] = self.carried
            entry["unfinished"] = self.unfinished
        return entry

    @classmethod
    def from_dict(cls, entry: Any) -> "CheckpointRecord":
        """Read an entry written by :meth:`to_dict` (of this release or an older one).

        Raises:
            ConfigurationError: If the entry is of a newer format, or does not hold what it must (:func:`check_entry`).

        """
        version = entry.get("version", 1) if isinstance(entry, Mapping) else 1  # release 0.1.0 wrote no version
        if isinstance(version, bool) or not isinstance(version, int) or version > CHECKPOINT_FORMAT:
            raise ConfigurationError(
                f"Expected the checkpoint's `TBPTTCallback` entry to be in format {CHECKPOINT_FORMAT} or older but it"
                f" is in format {version!r}, written by a newer release of lightning-tbptt. Upgrade lightning-tbptt to"
                " resume from it."
            )
        check_entry(entry)
        known = {f.name for f in dataclasses.fields(cls)}
        record = cls(**{key: value for key, value in entry.items() if key in known and key != "pending_gradients"})
        record.pending_gradients = record.gradients is not None
        record.carried = dict(record.carried or {})
        return record

    def for_process(self, rank: int) -> "CheckpointRecord":
        """The part of a record gathered from several processes that belongs to process ``rank``."""
        if not self.gathered:
            return self

        def own(value: Any) -> Any:
            return apply_to_collection(value, Tensor, lambda t: t[rank])

        gradients = own(self.gradients)
        present = own(self.gradients_present)
        if present is not None and gradients is not None:
            flags = present.tolist()
            gradients = {name: g for (name, g), flag in zip(gradients.items(), flags, strict=True) if flag}
        return dataclasses.replace(
            self,
            gradients=gradients,
            gradients_present=None,
            carried=own(self.carried),
            unfinished=own(self.unfinished),
        )
