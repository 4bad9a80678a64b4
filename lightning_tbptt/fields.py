"""The fields the callback reads from a batch: the lengths of its padded sequences and its reset markers.

``TBPTTCallback(lengths=...)`` names the place of a 1-D integer tensor of size ``B`` in the batch, and
``TBPTTCallback(resets=...)`` the place of the reset markers, in the same forms (:class:`FieldLocation`):

* a string: a key of a mapping, or a field of a namedtuple or dataclass (``lengths="lengths"``);
* an integer: a position in a tuple or list (``lengths=2`` for ``(x, y, lengths)``);
* a tuple of those: a path into nested collections (``lengths=("meta", "lengths")``);
* a callable: a function that returns the lengths from the batch. The lengths are then only read: the tensor in the
  batch is not replaced by segment lengths.

There is no auto-detection: a 1-D integer tensor of size ``B`` could as well be class labels.

Example:
    >>> import torch
    >>> where = FieldLocation(2)
    >>> batch = (torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([5, 2]))
    >>> where.get(batch)
    tensor([5, 2])
    >>> where.replace(batch, torch.tensor([3, 0]))[2]
    tensor([3, 0])
    >>> segment_lengths(torch.tensor([5, 2]), start=3, size=2)
    tensor([2, 0])
    >>> FieldLocation("lengths").get({"x": torch.zeros(2, 5)})
    Traceback (most recent call last):
      ...
    lightning_tbptt.errors.BatchError: Expected the batch to hold lengths at batch['lengths'] (from `TBPTTCallback(lengths='lengths')`) but the dict has no key 'lengths' (its keys: ['x']). Set `lengths` to where your collate function puts them.

"""  # noqa: E501

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from lightning_utilities.core.apply_func import is_dataclass_instance, is_namedtuple
from torch import Tensor

from lightning_tbptt.errors import BatchError, ConfigurationError

Key: TypeAlias = int | str
# In this order (int before str, callable before str) a config parser such as LightningCLI's (jsonargparse) reads
# `2` as an index and `package.function` as a callable by its import path.
FieldSpec: TypeAlias = int | tuple[Key, ...] | Callable[[Any], Any] | str


class FieldLocation:
    """Reads (and writes back) one field of a batch (its lengths, or its reset markers) at the place named by ``spec``.

    Args:
        spec: See the module documentation.
        argument: The callback argument ``spec`` came from (``"lengths"`` or ``"resets"``), for messages.

    Raises:
        ConfigurationError: If ``spec`` is none of the accepted forms.

    """

    def __init__(self, spec: FieldSpec, argument: str = "lengths") -> None:
        self.spec = spec
        self.argument = argument
        if callable(spec) and not isinstance(spec, (str, int, tuple)):
            self.path: tuple[Key, ...] | None = None
        else:
            path = spec if isinstance(spec, tuple) else (spec,)
            if not path or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in path):
                raise ConfigurationError(
                    f"Expected argument `{argument}` to be a key, an index, a tuple of keys and indices, or a callable"
                    f" but got {spec!r}. Pass e.g. `{argument}={argument!r}` for a dict batch or `{argument}=2` for"
                    f" `(x, y, {argument})`."
                )
            self.path = path

    @property
    def writable(self) -> bool:
        """Whether segment lengths can be written back into the batch (not for a callable)."""
        return self.path is not None

    def describe(self) -> str:
        """The place as Python code, for messages: ``batch['lengths']``, ``batch[2]``, ``f(batch)``."""
        if self.path is None:
            name = getattr(self.spec, "__name__", "<lambda>")
            return f"the `{self.argument}` callable's result" if name == "<lambda>" else f"{name}(batch)"
        return "batch" + "".join(f"[{k!r}]" for k in self.path)

    def get(self, batch: Any) -> Tensor:
        """Return the lengths tensor of ``batch`` (not validated: see :func:`check_lengths`)."""
        if self.path is None:
            value = self.spec(batch)  # type: ignore[operator]
        else:
            value = batch
            for key in self.path:
                value = self._child(value, key)
        if not isinstance(value, Tensor):
            raise BatchError(
                f"Expected the {self.argument} at {self.describe()} to be a tensor but got {type(value).__name__}."
                f" Return the {self.argument} as a tensor from your collate function."
            )
        return value

    def replace(self, batch: Any, value: Any) -> Any:
        """Return a shallow copy of ``batch`` with ``value`` at the lengths' place (``batch`` if not writable)."""
        if self.path is None:
            return batch
        return self._replace(batch, self.path, value)

    def _child(self, container: Any, key: Key) -> Any:
        where = (
            f"Expected the batch to hold {self.argument} at {self.describe()} (from"
            f" `TBPTTCallback({self.argument}={self.spec!r})`)"
        )
        fix = f"Set `{self.argument}` to where your collate function puts them."
        if isinstance(container, Mapping):
            if key not in container:
                raise BatchError(
                    f"{where} but the {type(container).__name__} has no key {key!r} (its keys: {list(container)})."
                    f" {fix}"
                )
            return container[key]
        if isinstance(key, str) and (is_namedtuple(container) or is_dataclass_instance(container)):
            if not hasattr(container, key):
                raise BatchError(f"{where} but the {type(container).__name__} has no field {key!r}. {fix}")
            return getattr(container, key)
        if isinstance(key, int) and isinstance(container, Sequence) and not isinstance(container, str):
            if not -len(container) <= key < len(container):
                raise BatchError(
                    f"{where} but the {type(container).__name__} has only {len(container)} elements. {fix}"
                )
            return container[key]
        raise BatchError(f"{where} but found a {type(container).__name__} where {key!r} was to be looked up. {fix}")

    def _replace(self, container: Any, path: tuple[Key, ...], value: Any) -> Any:
        key, rest = path[0], path[1:]
        # looked up first, the last key too: a place that does not exist is a BatchError, never a write that fails
        child = self._child(container, key)
        new = self._replace(child, rest, value) if rest else value
        if isinstance(container, Mapping):
            shallow: Any = copy.copy(container)
            shallow[key] = new
            return shallow
        if isinstance(key, str) and is_namedtuple(container):
            return container._replace(**{key: new})
        if isinstance(key, str) and is_dataclass_instance(container):
            if container.__dataclass_params__.frozen:
                raise BatchError(
                    f"Expected the {type(container).__name__} holding {self.argument} at {self.describe()} to be a"
                    " dataclass the segments' values can be written into but it is frozen (Lightning cannot move"
                    " frozen dataclasses to a device either). Drop `frozen=True`, or collate the batch as a dict."
                )
            # as Lightning's own `apply_to_collection` does: copy and set, without re-running `__init__`
            shallow_dataclass: Any = copy.copy(container)
            setattr(shallow_dataclass, key, new)
            return shallow_dataclass
        items = list(container)
        items[key] = new  # type: ignore[index]
        if is_namedtuple(container):
            return type(container)(*items)
        return type(container)(items)


def check_lengths(lengths: Tensor, *, where: str, batch_size: int, padded_length: int) -> Tensor:
    """Validate per-sequence ``lengths`` and return a copy on the CPU.

    Raises:
        BatchError: If ``lengths`` is not a 1-D integer tensor of size ``batch_size`` with values in
            ``[0, padded_length]``.

    """
    if lengths.dim() != 1 or lengths.shape[0] != batch_size:
        raise BatchError(
            f"Expected the lengths at {where} to be a 1-D tensor of size {batch_size} (the batch size) but got shape"
            f" {tuple(lengths.shape)}. Return one length per sequence, e.g. `torch.tensor([len(s) for s in seqs])`."
        )
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise BatchError(
            f"Expected the lengths at {where} to be an integer tensor but got dtype {lengths.dtype}. Convert them,"
            " e.g. `lengths.long()`."
        )
    on_cpu = lengths.detach().cpu()
    low, high = int(on_cpu.min()), int(on_cpu.max())
    if low < 0 or high > padded_length:
        raise BatchError(
            f"Expected the lengths at {where} to be between 0 and the padded length {padded_length} but got values"
            f" from {low} to {high}. Give each sequence's number of real time steps."
        )
    return on_cpu


def segment_lengths(lengths: Tensor, start: int, size: int) -> Tensor:
    """Return the valid steps of each sequence in the segment ``[start, start + size)``.

    That is ``clamp(lengths - start, 0, size)``.
    """
    return (lengths - start).clamp(0, size)
