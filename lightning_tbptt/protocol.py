"""The state protocol: where a recurrent module takes its state, and where it returns the new one.

The callback carries the state of a module by hooks around its ``forward``: before a call made without a state it puts
the carried state where ``forward`` takes it, and after the call it takes the new state from what ``forward``
returned. A :class:`StateSpec` says where both are, for modules that do not follow ``torch.nn``'s RNNs
(``forward(input, hx=None) -> (output, h_n)``):

* ``state_in``: a positional index of ``forward``'s arguments (1, the argument after the input) or a keyword name
  (``"initial_state"`` of linear-RNN layers, ``"mems"`` of segment-recurrent Transformers);
* ``state_out``: a path into the returned value: an index of a tuple or list, a key of a dict (or of a Hugging Face
  ``ModelOutput``), an attribute of a dataclass or another object, or a sequence of those
  (``("cache", "state")``);
* ``output``: the path of the sequence output (joined along time where the library splits a call inside a segment, at
  a reset or at an overlapping window's carry point);
* ``batch_dim``: the dimension of every state tensor that holds the batch's rows, where the rows are selected
  (``drop_finished``) or zeroed (``resets``); ``None`` finds the only dimension of the batch's size;
* ``time_dim``: the time dimension of the module's input (where a call is split); ``None`` is the callback's;
* ``select_rows``, ``zero_rows``, ``detach``: functions for a state that is not a nested collection of tensors with a
  batch dimension (e.g. a memory with a cursor), replacing what the library does with each tensor.

From a configuration file or the command line (LightningCLI), a spec is a string ``"IN -> OUT"`` (``"initial_state ->
1"``, ``"mems -> mems"``, ``"1 -> 1.cache.state"``) or a mapping of the fields above (``{"state_in": "mems",
"state_out": "mems", "batch_dim": 0}``).

Example:
    >>> StateSpec.parse("initial_state -> 1")
    StateSpec(state_in='initial_state', state_out=(1,), output=(0,))
    >>> StateSpec.parse({"state_in": "mems", "state_out": "mems", "output": "hidden", "batch_dim": 0})
    StateSpec(state_in='mems', state_out=('mems',), output=('hidden',), batch_dim=0)
    >>> spec = StateSpec.parse("1 -> 1.cache.state")
    >>> returned = ("out", {"cache": {"state": "h"}})
    >>> spec.state_of(returned), spec.with_output(returned, "joined")
    ('h', ('joined', {'cache': {'state': 'h'}}))

"""

import copy
import dataclasses
import inspect
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

from lightning_tbptt.errors import ConfigurationError, ModelError

Key = int | str
Path = tuple[Key, ...]


def _key(text: str) -> Key:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _path(value: Any, argument: str) -> Path:
    if isinstance(value, bool):
        raise ConfigurationError(f"Expected {argument} to be an index, a name or a path of them but got {value!r}.")
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        if not value.strip() or any(not part.strip() for part in value.split(".")):
            raise ConfigurationError(f"Expected {argument} to be an index, a name or a dotted path but got {value!r}.")
        return tuple(_key(part) for part in value.split("."))
    if isinstance(value, Sequence) and all(isinstance(k, (int, str)) and not isinstance(k, bool) for k in value):
        return tuple(value)
    raise ConfigurationError(
        f'Expected {argument} to be an index, a name, a dotted path ("cache.state") or a sequence of indices and'
        f" names but got {value!r}."
    )


def _shown(path: Path) -> str:
    return ".".join(str(key) for key in path) if path else "(the whole returned value)"


@dataclass(frozen=True)
class StateSpec:
    """Where a recurrent module takes and returns its state (see :mod:`lightning_tbptt.protocol`)."""

    state_in: Key = 1
    """Where ``forward`` takes the state: a positional index (1: the argument after the input) or a keyword name."""
    state_out: Key | Path = (1,)
    """The path of the new state in what ``forward`` returns (``()``: the whole value, as for a recurrent cell)."""
    output: Key | Path | None = (0,)
    """The path of the sequence output in what ``forward`` returns (``None``: the module returns only the state)."""
    batch_dim: int | None = None
    """The dimension of every state tensor that holds the batch's rows (``None``: the only one of the batch's size)."""
    time_dim: int | None = None
    """The time dimension of the module's input (``None``: the callback's ``time_dim``)."""
    select_rows: Callable[[Any, Tensor], Any] | None = None
    """``select_rows(state, rows)``: the state of the rows ``rows`` (indices), for ``drop_finished``."""
    zero_rows: Callable[[Any, Tensor], Any] | None = None
    """``zero_rows(state, mask)``: the state with the rows of the boolean ``(B,)`` mask started anew, for ``resets``."""
    detach: Callable[[Any], Any] | None = None
    """``detach(state)``: the state cut from its graph, to carry into the next segment."""

    def __post_init__(self) -> None:
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for key, value in _checked(fields, "a `StateSpec`").items():
            object.__setattr__(self, key, value)

    def __repr__(self) -> str:
        fields = [f"state_in={self.state_in!r}", f"state_out={self.state_out!r}", f"output={self.output!r}"]
        for field in dataclasses.fields(self)[3:]:
            value = getattr(self, field.name)
            if value is not None:
                fields.append(f"{field.name}={value!r}")
        return f"StateSpec({', '.join(fields)})"

    @classmethod
    def parse(cls, value: "StateSpec | str | Mapping[str, Any]", name: str = "") -> "StateSpec":
        """A spec from a :class:`StateSpec`, a string ``"IN -> OUT"`` or a mapping of its fields.

        Raises:
            ConfigurationError: Naming the module, the value and the forms a spec takes.

        """
        where = f"`recurrent_modules[{name!r}]`" if name else "a state spec"
        if isinstance(value, StateSpec):
            return value
        if isinstance(value, str):
            parts = value.split("->")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ConfigurationError(
                    f"Expected {where} to be a string 'IN -> OUT' (e.g. 'initial_state -> 1', 'mems -> mems') but got"
                    f" {value!r}: IN is where forward takes the state (an argument's index or name), OUT where it"
                    " returns the new one (an index, a key or an attribute, dotted for a path)."
                )
            return cls(state_in=_key(parts[0]), state_out=_path(parts[1].strip(), f"{where} (OUT)"))
        if isinstance(value, Mapping):
            known = {field.name for field in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigurationError(
                    f"Expected the keys of {where} to be among {sorted(known)} but got {unknown}. See"
                    " `lightning_tbptt.protocol.StateSpec`."
                )
            return cls(**_checked(dict(value), where))
        raise ConfigurationError(
            f"Expected {where} to be a StateSpec, a string 'IN -> OUT' or a mapping of StateSpec's fields but got"
            f" {type(value).__name__} {value!r}."
        )

    def state_of(self, returned: Any, name: str = "the module") -> Any:
        """The new state in ``returned``, what the module's ``forward`` returned.

        Raises:
            ModelError: If the path is not in ``returned``.

        """
        return _get(returned, cast(Path, self.state_out), name, "state_out")

    def output_of(self, returned: Any, name: str = "the module") -> Any:
        """The sequence output in ``returned``."""
        if self.output is None:
            return None
        return _get(returned, cast(Path, self.output), name, "output")

    def with_output(self, returned: Any, output: Any) -> Any:
        """``returned`` with its sequence output replaced by ``output`` (a copy; ``returned`` is not changed)."""
        if self.output is None:
            return returned
        return _replaced(returned, cast(Path, self.output), output)

    def takes_state(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], parameter: str | None) -> Any:
        """The state a call was given explicitly (``None`` if none)."""
        if isinstance(self.state_in, int):
            if len(args) > self.state_in:
                return args[self.state_in]
            return kwargs.get(parameter) if parameter is not None else None
        return kwargs.get(self.state_in)

    def give_state(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], parameter: str | None, state: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's arguments with ``state`` where ``forward`` takes it.

        In its positional slot where the call has one, else under its keyword (``parameter``, the name of the
        positional parameter, or ``state_in``).
        """
        if isinstance(self.state_in, int):
            if len(args) > self.state_in:
                return (*args[: self.state_in], state, *args[self.state_in + 1 :]), kwargs
            if parameter is None:  # (taken through `*args` only)
                return (*args, *([None] * (self.state_in - len(args))), state), kwargs
            return args, {**kwargs, parameter: state}
        return args, {**kwargs, self.state_in: state}


def _checked(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields of a spec, checked, with ``state_in`` keys and paths in their normal forms."""
    if "state_in" in fields:
        state_in = fields["state_in"]
        if isinstance(state_in, str):
            state_in = _key(state_in)
        if isinstance(state_in, bool) or not isinstance(state_in, (int, str)):
            raise ConfigurationError(
                f"Expected `state_in` of {where} to be an argument's index or name but got {state_in!r}."
            )
        fields["state_in"] = state_in
    for key in ("state_out", "output"):
        if key in fields and fields[key] is not None:
            fields[key] = _path(fields[key], f"`{key}` of {where}")
    for key in ("batch_dim", "time_dim"):
        if fields.get(key) is not None and (isinstance(fields[key], bool) or not isinstance(fields[key], int)):
            raise ConfigurationError(f"Expected `{key}` of {where} to be an integer but got {fields[key]!r}.")
    for key in ("select_rows", "zero_rows", "detach"):
        if fields.get(key) is not None and not callable(fields[key]):
            raise ConfigurationError(f"Expected `{key}` of {where} to be a function but got {fields[key]!r}.")
    return fields


def _get(returned: Any, path: Path, name: str, field: str) -> Any:
    value = returned
    for depth, key in enumerate(path):
        try:
            if isinstance(value, Mapping):
                value = value[key]
            elif isinstance(key, int) and isinstance(value, (tuple, list)):
                value = value.__getitem__(key)
            elif isinstance(key, str):
                value = getattr(value, key)
            else:
                raise TypeError
        except (KeyError, IndexError, AttributeError, TypeError):
            raise ModelError(
                f"Expected what `{name}` returns to hold `{field}={_shown(path)}` but"
                f" {_shown(path[:depth]) if depth else 'the returned value'} is {_described(value)}, which has no"
                f" {key!r}. Give the spec the path of its {'new state' if field == 'state_out' else 'sequence output'}"
                f" in that value (`recurrent_modules={{{name!r}: 'IN -> OUT'}}`)."
            ) from None
    return value


def _described(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} of keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    if dataclasses.is_dataclass(value):
        return f"a {type(value).__name__} of fields {[f.name for f in dataclasses.fields(value)]}"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _replaced(value: Any, path: Path, new: Any) -> Any:
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(value, MutableMapping):
        copied = copy.copy(value)
        copied[key] = _replaced(value[key], rest, new)
        return copied
    if isinstance(value, Mapping):
        return {**value, key: _replaced(value[key], rest, new)}
    if isinstance(value, tuple) and isinstance(key, int):
        items = list(value)
        items[key] = _replaced(value[key], rest, new)
        return value._make(items) if hasattr(value, "_make") else tuple(items)
    if isinstance(value, list) and isinstance(key, int):
        items = list(value)
        items[key] = _replaced(value[key], rest, new)
        return items
    assert isinstance(key, str)
    inner = _replaced(getattr(value, key), rest, new)
    if isinstance(value, tuple) and hasattr(value, "_replace"):  # a namedtuple, by field name
        return value._replace(**{key: inner})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{key: inner})
    copied = copy.copy(value)
    setattr(copied, key, inner)
    return copied


def resolved(module: nn.Module, spec: StateSpec) -> StateSpec:
    """``spec`` with a ``state_in`` keyword that ``forward`` also takes by position turned into that position."""
    if isinstance(spec.state_in, int):
        return spec
    positional = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if spec.state_in in positional:
        return dataclasses.replace(spec, state_in=positional.index(spec.state_in))
    return spec


def state_parameter(name: str, module: nn.Module, spec: StateSpec) -> str | None:
    """The name of the parameter of ``module.forward`` that ``spec.state_in`` points to (checked against it).

    Raises:
        ModelError: If ``forward`` takes no such argument.

    """
    signature = inspect.signature(module.forward)
    parameters = list(signature.parameters.values())
    open_keywords = any(p.kind == p.VAR_KEYWORD for p in parameters)
    if isinstance(spec.state_in, str):
        if spec.state_in in signature.parameters or open_keywords:
            return spec.state_in
        raise ModelError(
            f"Expected the forward of `{name}` ({type(module).__name__}) to take the keyword `{spec.state_in}` its"
            f" state spec names but got `forward{signature}`. Name the argument that takes the state (e.g."
            f" `recurrent_modules={{{name!r}: '{parameters[1].name if len(parameters) > 1 else 'state'} -> 1'}}`)."
        )
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_any = any(p.kind == p.VAR_POSITIONAL for p in parameters)
    if spec.state_in < 0 or (spec.state_in >= len(positional) and not takes_any):
        which = "second argument" if spec.state_in == 1 else f"argument {spec.state_in} (counting from 0)"
        raise ModelError(
            f"Expected the module `{name}` ({type(module).__name__}) named in `recurrent_modules` to take its state"
            f" as {which}, `forward(input, state=None) -> (output, new_state)`, but got `forward{signature}`. Give"
            " its forward a state argument, name the keyword that takes it"
            f" (`recurrent_modules={{{name!r}: 'initial_state -> 1'}}`), or remove it from `recurrent_modules`."
        )
    if spec.state_in < len(positional):
        return positional[spec.state_in].name
    return None
