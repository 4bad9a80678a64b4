"""What a checkpoint's ``TBPTTCallback`` entry must hold to be resumed from, checked before anything is restored.

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

from collections.abc import Mapping
from typing import Any, TypeGuard

from torch import Tensor, nn

from lightning_tbptt.errors import ConfigurationError

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
