"""Carrying the recurrent state of a model from one segment to the next without changing the model.

Every carried module gets a forward pre-hook and a forward hook:

* a call made *without* a state (the state argument absent or ``None``) receives the state the module returned at
  the end of the previous segment, detached from its graph; a state passed explicitly always wins;
* the state returned by the module's last call in a segment becomes the carried state once the segment is done.

A recurrent *cell* (``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell``) is stepped by the model, one call per time step,
each call fed the state the previous one returned: a call without a state (the loop's first, starting from ``None``)
receives the carried state, and the state the cell returns at its last call in the segment is carried.

The carried state changes only between segments, so a module called several times in one segment (or re-run by
activation checkpointing during backward) sees the same carried state every time. Carried tensors are fresh,
detached, contiguous tensors that nothing writes into.

Example:
    >>> import torch
    >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
    >>> carrier = StateCarrier({"lstm": lstm})
    >>> x = torch.randn(2, 6, 3)
    >>> with carrier.segment():
    ...     first, _ = lstm(x[:, :3])
    >>> with carrier.segment():
    ...     second, _ = lstm(x[:, 3:])
    >>> full, _ = lstm(x)  # outside a segment the hooks do nothing
    >>> torch.allclose(torch.cat([first, second], dim=1), full, atol=1e-6)
    True
    >>> carrier.carried["lstm"][0].requires_grad
    False
    >>> carrier.remove()

"""

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_tbptt.errors import ModelError
from lightning_tbptt.protocol import StateSpec, resolved, state_parameter


def detach_state(state: Any) -> Any:
    """Return ``state`` (any nested collection of tensors) with every tensor detached and contiguous.

    Example:
        >>> import torch
        >>> h = torch.ones(2, 3, requires_grad=True) * 2
        >>> detached = detach_state((h, [h.t()]))
        >>> detached[0].grad_fn is None, detached[1][0].is_contiguous()
        (True, True)

    """
    return apply_to_collection(state, Tensor, lambda t: t.detach().contiguous())


def _is_inside(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _plain_name(name: str) -> str:
    """``name`` seen through ``torch.compile`` wrappers: ``rnn._orig_mod.cell`` is ``rnn.cell``."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile`` wraps a module in."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def named_submodules(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules of ``model`` by qualified name, seen through ``torch.compile`` wrappers.

    A submodule compiled with ``torch.compile`` is listed under its own name with the module it compiles (whose hooks
    run inside the compiled code), so that names, and the carried state in checkpoints, do not depend on compiling.
    """
    return {
        _plain_name(name): module for name, module in model.named_modules() if name and not _is_compile_wrapper(module)
    }


_RECURRENT_NAMES = ("RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell")


def _is_recurrent(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's recurrent modules or cells (also compiled by TorchScript)."""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return True
    return isinstance(module, torch.jit.ScriptModule) and getattr(module, "original_name", "") in _RECURRENT_NAMES


def _check_names(model: nn.Module, names: Sequence[str], argument: str, available: Sequence[str]) -> None:
    unknown = [name for name in names if name not in available]
    if unknown:
        shown = ", ".join(repr(n) for n in available[:10]) + (", ..." if len(available) > 10 else "")
        raise ModelError(
            f"Expected every name in `{argument}` to be a submodule of {type(model).__name__} but got {unknown}."
            f" Use names as listed by `model.named_modules()`: {shown}."
        )


def recurrent_candidates(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The modules :func:`find_recurrent_modules` returns, without its checks (names are expected to be valid)."""
    include = [_plain_name(name) for name in include]
    exclude = [_plain_name(name) for name in exclude]
    found: dict[str, nn.Module] = {}
    for name, module in named_submodules(model).items():
        if _is_inside(name, exclude):
            continue
        owned_by_included = any(name.startswith(owner + ".") for owner in include)
        if name in include or (_is_recurrent(module) and not owned_by_included):
            found[name] = module
    return found


def find_recurrent_modules(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """Return the submodules of ``model`` whose state is carried across segments, by qualified name.

    These are every :class:`torch.nn.RNNBase` submodule (``LSTM``, ``GRU``, ``RNN``), every recurrent cell
    (:class:`torch.nn.RNNCellBase`: ``LSTMCell``, ``GRUCell``, ``RNNCell``) and every module named in ``include``,
    except the modules named in ``exclude`` and everything inside them. A module named in ``include`` owns the state
    of the recurrent modules inside it, which are then not carried separately. A module compiled with
    ``torch.compile`` counts as the module it compiles, under its own name.

    Args:
        model: The model to search.
        include: Names of custom recurrent modules that follow ``forward(input, state=None) -> (output, state)``.
        exclude: Names of modules (and their children) whose state must not be carried.

    Raises:
        ModelError: If a name is not a submodule of ``model``, a bidirectional RNN is not excluded, or a carried
            module is a TorchScript module (which takes no hooks).

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder = nn.GRU(3, 4)
        ...         self.context = nn.LSTM(3, 4, bidirectional=True)
        >>> sorted(find_recurrent_modules(Net(), exclude=["context"]))
        ['encoder']
        >>> find_recurrent_modules(Net())
        Traceback (most recent call last):
          ...
        lightning_tbptt.errors.ModelError: Cannot carry the state of the bidirectional module `context` (LSTM) across segments: its backward direction needs time steps of later segments. Pass `TBPTTCallback(exclude_modules=['context'])` to let it start from zeros in every segment, or make it unidirectional.

    """  # noqa: E501
    available = list(named_submodules(model))
    _check_names(model, [_plain_name(name) for name in include], "recurrent_modules", available)
    _check_names(model, [_plain_name(name) for name in exclude], "exclude_modules", available)
    conflicting = [name for name in include if _is_inside(_plain_name(name), [_plain_name(n) for n in exclude])]
    if conflicting:
        raise ModelError(
            f"Expected `recurrent_modules` and `exclude_modules` not to overlap but {conflicting} are both carried and"
            " excluded. Remove them from one of the two."
        )
    found = recurrent_candidates(model, include, exclude)
    for name, module in found.items():
        if isinstance(module, torch.jit.ScriptModule):
            kind = getattr(module, "original_name", type(module).__name__)
            raise ModelError(
                f"Cannot carry the state of `{name}` (a TorchScript {kind}): TorchScript modules take no forward"
                " hooks, through which the state is carried. Use the module without `torch.jit.script` (e.g."
                f" `torch.compile` it instead), or pass `TBPTTCallback(exclude_modules=[{name!r}])` to let it start"
                " from zeros in every segment."
            )
        if getattr(module, "bidirectional", False):
            raise ModelError(
                f"Cannot carry the state of the bidirectional module `{name}` ({type(module).__name__}) across"
                " segments: its backward direction needs time steps of later segments. Pass"
                f" `TBPTTCallback(exclude_modules=[{name!r}])` to let it start from zeros in every segment, or make"
                " it unidirectional."
            )
    return found


def _input_argument(module: nn.Module) -> str:
    """Return the name of the parameter through which ``module.forward`` takes its input (the first one)."""
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return "input"
    parameters = list(inspect.signature(module.forward).parameters)
    return parameters[0] if parameters else "input"


def default_spec(module: nn.Module, given: StateSpec | None = None) -> StateSpec:
    """The state spec of ``module``: ``given``, or what ``torch.nn``'s RNNs and cells follow, or the custom default.

    ``nn.LSTM``/``nn.GRU``/``nn.RNN``: ``forward(input, hx) -> (output, h_n)``, the rows along dimension 1 of the state.
    Cells: ``forward(input, hx) -> h'`` (the whole returned value is the state), the rows along dimension 0. A custom
    module: ``forward(input, state=None) -> (output, new_state)``.
    """
    if given is not None:
        return given
    if isinstance(module, nn.RNNBase):
        return StateSpec(batch_dim=1, time_dim=1 if module.batch_first else 0)
    if isinstance(module, nn.RNNCellBase):
        return StateSpec(state_out=(), output=None, batch_dim=0)
    return StateSpec()


class CarriedState:
    """The carried state of one stream of batches (training, or evaluation).

    Owned by its :class:`~lightning_tbptt.streams.Stream`: the state of each module and the rows of the batch it holds.
    """

    def __init__(self) -> None:
        self.carried: dict[str, Any] = {}
        self.rows: dict[str, tuple[Tensor | None, int]] = {}

    def clear(self) -> None:
        """Forget every state: the stream starts from zeros."""
        self.carried.clear()
        self.rows.clear()


class _Splits:
    """Where, inside one segment, the recurrent calls are split.

    ``first`` is the ``(B,)`` mask of rows whose state is zeroed before the segment's first step (or ``None``);
    ``cuts`` lists the later steps ``c`` at which the call is split, each with the ``(B,)`` mask of rows that start a
    new sequence there (or ``None``) and whether the state there is the one carried into the next segment.
    """

    def __init__(self, length: int, resets: Tensor | None, carry_at: int | None) -> None:
        self.length = length
        self.first = None
        marked: dict[int, Tensor | None] = {}
        if resets is not None:
            first = resets[:, 0]
            self.first = first if bool(first.any()) else None
            columns = torch.nonzero(resets[:, 1:].any(dim=0)).flatten() + 1
            marked = {int(c): resets[:, int(c)] for c in columns}
        self.carry_at = carry_at if carry_at is not None and 0 < carry_at < length else None
        steps = sorted(set(marked) | ({self.carry_at} if self.carry_at is not None else set()))
        self.cuts = [(c, marked.get(c), c == self.carry_at) for c in steps]

    @property
    def needed(self) -> bool:
        return self.first is not None or bool(self.cuts)


class StateCarrier:
    """Carries the state of the given modules across segments through forward hooks.

    The state is kept per *stream*: training and evaluation carry their own states, so that validating in the middle of
    a training epoch never disturbs the training state (and the reverse).

    Args:
        modules: The modules to carry, by name (see :func:`find_recurrent_modules`).
        time_dim: The time dimension along which batches are cut, and of the inputs of custom recurrent modules
            (``torch.nn`` RNNs: from their ``batch_first``).
        reset_nonfinite: Zero the carried state of every row whose state holds a ``NaN`` or an infinity, as if a new
            sequence started there; the rows are reported by :meth:`take_nonfinite`.
        alive: Called when a module is called outside a segment: ``False`` removes the hooks (the carrier was left
            behind by a fit that ended without removing them). ``None``: the hooks stay until :meth:`remove`.

    Raises:
        ModelError: If a custom module takes no state argument (before any hook is added), or a hook cannot be added.

    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        time_dim: int = 1,
        reset_nonfinite: bool = False,
        alive: Callable[[], bool] | None = None,
        specs: Mapping[str, StateSpec] | None = None,
    ) -> None:
        self.modules = dict(modules)
        """The carried modules, by name."""
        given = {_plain_name(name): spec for name, spec in (specs or {}).items()}
        self._given = set(given)  # (the others follow `default_spec`: a custom one must return a pair)
        self.specs = {name: default_spec(module, given.get(name)) for name, module in modules.items()}
        """Where each module takes and returns its state (:class:`~lightning_tbptt.protocol.StateSpec`)."""
        self.time_dim = time_dim
        self.reset_nonfinite = reset_nonfinite
        self._alive = alive
        self._streams: dict[str, CarriedState] = {}
        self._stream = self._stream_named("train")
        self._pending: dict[str, Any] = {}
        self._pieces: dict[str, tuple[list[Tensor], int]] = {}
        self._captured: dict[str, Any] = {}
        self._calls: dict[str, int] = {}
        self._fed_carried: dict[str, bool] = {}
        self._nonfinite: list[tuple[Tensor, Tensor | None]] = []
        self._active = False
        self._length = 0
        self._splits: _Splits | None = None
        self._handles: list[RemovableHandle] = []
        # may raise: no hook yet
        arguments = {name: state_parameter(name, module, self.specs[name]) for name, module in modules.items()}
        self.specs = {name: resolved(modules[name], spec) for name, spec in self.specs.items()}
        self._cells = {name for name, module in modules.items() if isinstance(module, nn.RNNCellBase)}
        self._batch_dims = {name: spec.batch_dim for name, spec in self.specs.items()}
        self._input_names = {name: _input_argument(module) for name, module in modules.items()}
        self._time_dims = {
            name: time_dim if spec.time_dim is None else spec.time_dim for name, spec in self.specs.items()
        }
        try:
            for name, module in modules.items():
                argument = arguments[name]
                self._handles.append(
                    module.register_forward_pre_hook(partial(self._inject, name, argument), with_kwargs=True)
                )
                self._handles.append(module.register_forward_hook(partial(self._capture, name)))
        except Exception as error:  # all or nothing: no module keeps a hook
            self.remove()
            raise ModelError(
                f"Cannot carry the state of `{name}` ({type(module).__name__}): adding its forward hooks failed with"
                f" {type(error).__name__}: {error}. Pass `TBPTTCallback(exclude_modules=[{name!r}])` to let it start"
                " from zeros in every segment."
            ) from error

    def _stream_named(self, stream: str) -> CarriedState:
        return self._streams.setdefault(stream, CarriedState())

    @property
    def carried(self) -> dict[str, Any]:
        """The carried states of the training stream, by module name."""
        return self._stream_named("train").carried

    def given_explicit_state(self) -> list[str]:
        """The modules whose first call in every segment so far was given a state explicitly (so nothing is carried).

        A state passed explicitly always wins over the carried one; a module that always gets one never receives the
        carried state.
        """
        return [name for name, fed in self._fed_carried.items() if not fed]

    def returned_states(self) -> dict[str, Any]:
        """The states the modules returned so far in the running segment (with their graph), by module name.

        After the segment these become the carried states, detached; ``exact=True`` joins them to the segment's loss.
        """
        return dict(self._pending)

    def take_nonfinite(self) -> list[tuple[Tensor, Tensor | None]]:
        """The rows reset because their state was not finite, since the last call (with ``reset_nonfinite``).

        One ``(bad, rows)`` pair per segment that had any module's state carried: ``bad`` is a ``(B_seg,)`` boolean
        tensor on the state's device (no host synchronisation was made to find it), ``rows`` the indices of the
        segment's rows within its batch, or ``None`` for all rows.
        """
        taken, self._nonfinite = self._nonfinite, []
        return taken

    @contextmanager
    def segment(
        self,
        rows: Tensor | None = None,
        batch_size: int = 0,
        resets: Tensor | None = None,
        stream: "str | CarriedState" = "train",
        length: int = 0,
        carry_at: int | None = None,
    ) -> Iterator[None]:
        """Activate the hooks for one segment; on success, the states the modules returned become the carried ones.

        Args:
            rows: Indices (sorted, on the CPU) of the batch rows this segment holds, when finished rows are dropped;
                each carried state is first restricted to them. ``None``: every row of the batch.
            batch_size: Number of rows of the segment.
            resets: The reset markers, a boolean ``(B, T_seg)`` tensor on the CPU, ``True`` where a row starts a new
                sequence: that row's state is zeroed right before that step (a call is split there when the step is
                inside the segment). ``None``: no row starts anew.
            stream: Whose state is carried: a :class:`CarriedState`, or the name of one the carrier keeps
                (``"train"``, or an evaluation stream).
            length: Number of time steps of the segment (needed with ``carry_at``; with it, a recurrent module that
                reads time along the batch's rows is refused). 0: unknown.
            carry_at: Carry into the next segment the state after this many steps of the segment (the calls are split
                there), rather than the state at its end: the next segment is an overlapping window that starts there.

        If the segment raises, the carried state is left as it was.

        Raises:
            ModelError: If a recurrent cell was not called once per time step where the segment has a reset or a
                carry point inside it (which call is which step would be unknown).

        """
        self._stream = stream if isinstance(stream, CarriedState) else self._stream_named(stream)
        if rows is not None:
            self._restrict(rows)
        length = length if resets is None else resets.shape[1]
        splits = _Splits(length, resets, carry_at)
        self._splits = splits if splits.needed else None
        self._length = length
        self._active = True
        try:
            yield
            self._check_cell_calls()
        except BaseException:
            self._pending.clear()
            self._pieces.clear()
            self._captured.clear()
            raise
        finally:
            self._active = False
            self._splits = None
            self._calls.clear()
            self._captured.clear()
        bad_rows = None
        for name, state in self._pending.items():
            detach = self.specs[name].detach or detach_state
            detached = detach(state)
            if self.reset_nonfinite:
                detached, bad = self._reset_nonfinite_rows(name, detached, batch_size)
                bad_rows = bad if bad_rows is None else bad_rows | bad
            self._stream.carried[name] = detached
            self._stream.rows[name] = (rows, batch_size)
        self._pending.clear()
        if bad_rows is not None:
            self._nonfinite.append((bad_rows, rows))

    def _check_cell_calls(self) -> None:
        splits = self._splits
        if splits is None or not splits.cuts:
            return
        for name in self._cells:
            calls = self._calls.get(name, 0)
            if calls not in (0, splits.length):
                raise ModelError(
                    f"Expected the recurrent cell `{name}` ({type(self.modules[name]).__name__}) to be called once per"
                    f" time step of the segment ({splits.length}) but it was called {calls} times: where a sequence"
                    " starts inside a segment (`resets`) or the next window starts (`stride`), the library must know"
                    " which call is which step. Step the cell once per time step, in order, or start new sequences"
                    " only at batch boundaries and do not set `stride`."
                )

    def _reset_nonfinite_rows(self, name: str, state: Any, batch_size: int) -> tuple[Any, Tensor]:
        """Zero the rows of ``state`` that hold a non-finite value; return it and the ``(B,)`` mask of those rows."""
        tensors: list[Tensor] = []
        apply_to_collection(state, Tensor, tensors.append)
        count = batch_size or self._rows_in(name, tensors)
        dims = [self._row_dim(name, tensor, count) for tensor in tensors]
        bad = torch.zeros(count, dtype=torch.bool, device=tensors[0].device if tensors else None)
        for tensor, dim in zip(tensors, dims, strict=True):
            if tensor.is_floating_point() or tensor.is_complex():
                other = [d for d in range(tensor.dim()) if d != dim]
                finite = torch.isfinite(tensor).all(dim=other) if other else torch.isfinite(tensor)
                bad = bad | ~finite.to(bad.device)
        return self._zero_rows(name, state, bad), bad

    def _rows_in(self, name: str, tensors: list[Tensor]) -> int:
        dim = self._batch_dims[name]
        if dim is not None and tensors and tensors[0].dim() > dim:
            return tensors[0].shape[dim]
        return 0

    def _restrict(self, rows: Tensor) -> None:
        stream = self._stream
        for name, state in stream.carried.items():
            held, count = stream.rows[name]
            if held is not None and torch.equal(held, rows):
                continue
            positions = rows if held is None else torch.searchsorted(held, rows)
            select = self.specs[name].select_rows
            if select is not None:
                stream.carried[name] = select(state, positions)
            else:
                stream.carried[name] = apply_to_collection(state, Tensor, self._select, name, positions, count)
            stream.rows[name] = (rows, rows.numel())

    def _select(self, tensor: Tensor, name: str, positions: Tensor, count: int) -> Tensor:
        return tensor.index_select(self._row_dim(name, tensor, count), positions.to(tensor.device, non_blocking=True))

    def _row_dim(self, name: str, tensor: Tensor, count: int) -> int:
        """The dimension of ``tensor`` (a state of ``name``) that holds the ``count`` sequences.

        That is dimension 1 for ``torch.nn`` RNNs (``(layers, B, H)``), 0 for cells (``(B, H)``); for custom modules,
        the only dimension of size ``count``.
        """
        declared = self._batch_dims[name]
        if declared is not None and name in self._given:
            if -tensor.dim() <= declared < tensor.dim() and tensor.shape[declared] == count:
                return declared % tensor.dim()
            raise ModelError(
                f"Cannot select rows of the state of `{name}`: its state spec declares `batch_dim={declared}`, but a"
                f" state tensor of shape {tuple(tensor.shape)} does not hold the {count} sequences along it. Declare"
                " the dimension that holds the rows (`batch_dim`), or a `select_rows`/`zero_rows` for a state that"
                " has none."
            )
        dims = [d for d, size in enumerate(tensor.shape) if size == count]
        if declared is not None:
            dims = [d for d in dims if d == declared]
        if len(dims) != 1:
            found = "no dimension" if not dims else f"dimensions {dims}"
            raise ModelError(
                f"Cannot select rows of the state of `{name}`: expected exactly one dimension of its state tensors to"
                f" hold the {count} sequences but found {found} of that size in shape {tuple(tensor.shape)}, so the"
                f" rows cannot be told apart. Declare the dimension that holds the rows in the module's state spec"
                f" (`TBPTTCallback(recurrent_modules={{{name!r}: {{'state_in': ..., 'batch_dim': 1}}}})`), give the"
                f" state's other dimensions sizes other than {count}, or use this model without `drop_finished` and"
                " `resets`."
            )
        return dims[0]

    def zero_rows(self, name: str, state: Any, rows: Tensor) -> Any:
        """``state``, a state of the module ``name``, with the rows marked in the boolean ``(B,)`` ``rows`` zeroed."""
        return self._zero_rows(name, state, rows)

    def _zero_rows(self, name: str, state: Any, rows: Tensor) -> Any:
        """Return ``state`` with the rows marked in the boolean ``rows`` set to zero (no gradient flows through).

        Tensors keep their dtype (a boolean tensor's rows become ``False``); a spec's ``zero_rows`` replaces this.
        """
        custom = self.specs[name].zero_rows
        if custom is not None:
            return custom(state, rows)

        def zero(tensor: Tensor) -> Tensor:
            dim = self._row_dim(name, tensor, rows.numel())
            shape = [1] * tensor.dim()
            shape[dim] = rows.numel()
            return tensor.masked_fill(rows.to(tensor.device, non_blocking=True).view(shape), 0)

        return apply_to_collection(state, Tensor, zero)

    def reset(self, stream: str | None = None) -> None:
        """Forget the carried state of ``stream`` (of every stream if ``None``): it starts from zeros again."""
        for name, state in self._streams.items():
            if stream is None or name == stream:
                state.clear()
        self._pending.clear()
        self._pieces.clear()
        self._captured.clear()
        self._nonfinite.clear()

    def remove(self) -> None:
        """Remove every hook from the modules."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.reset()

    @property
    def hooked(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def _inject(
        self, name: str, argument: str | None, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if not self._active:
            if self._alive is not None and not self._alive():
                self.remove()
            return None
        spec = self.specs[name]
        explicit = spec.takes_state(args, kwargs, argument)
        call = self._calls.get(name, 0)
        if call == 0:
            self._fed_carried[name] = self._fed_carried.get(name, False) or explicit is None
        inputs = args[0] if args else kwargs.get(self._input_names[name])
        if name in self._cells:
            return self._inject_cell(name, argument, module, args, kwargs, explicit, inputs, call)
        state = self._stream.carried.get(name)
        if isinstance(module, nn.RNNBase) and isinstance(inputs, Tensor):
            self._check_rnn_input(name, module, inputs, state if explicit is None else None)
        if explicit is not None:
            return None  # a state passed explicitly always wins
        splits = self._splits
        if splits is not None and splits.first is not None and state is not None:
            state = self._zero_rows(name, state, splits.first)
        if splits is not None and splits.cuts:
            args, kwargs, state = self._run_pieces(name, module, args, kwargs, argument, state, splits)
        if state is None:
            return None
        return spec.give_state(args, kwargs, argument, state)

    def _inject_cell(
        self,
        name: str,
        argument: str | None,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        explicit: Any,
        inputs: Any,
        call: int,
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """A cell's call ``call`` of the segment: its input is time step ``call``, its state the previous step's."""
        state = explicit
        splits = self._splits
        if state is None:
            state = self._stream.carried.get(name)
            if state is not None and splits is not None and splits.first is not None and call == 0:
                state = self._zero_rows(name, state, splits.first)
        if state is not None and isinstance(inputs, Tensor) and inputs.dim() == 2:
            self._check_rows(name, module, inputs.shape[0], state)
        if state is not None and splits is not None and call > 0:
            marked = next((rows for step, rows, _ in splits.cuts if step == call), None)
            if marked is not None:
                state = self._zero_rows(name, state, marked)  # a new sequence starts at this step
        if state is None or state is explicit:
            return None
        return self.specs[name].give_state(args, kwargs, argument, state)

    def _check_rnn_input(self, name: str, module: nn.RNNBase, inputs: Tensor, state: Any) -> None:
        """Refuse an input laid out against the cut (time along the batch's rows), or with other rows than the state."""
        if inputs.dim() != 3:
            return  # unbatched, or packed
        time_dim = 1 if module.batch_first else 0
        batch_dim = 1 - time_dim
        length = self._length
        cut = self.time_dim
        if length and cut == batch_dim and inputs.shape[batch_dim] == length and inputs.shape[time_dim] != length:
            first_dim = "time-first `(T, B, ...)`" if time_dim == 0 else "batch-first `(B, T, ...)`"
            other_dim = "batch-first" if time_dim == 0 else "time-first"
            raise ModelError(
                f"Expected the recurrent module `{name}` ({type(module).__name__}, batch_first={module.batch_first})"
                f" to read time along the dimension the batch was cut along, `time_dim={cut}`, but it reads time along"
                f" dimension {time_dim} and finds the segment's {length} steps along its batch dimension (input shape"
                f" {tuple(inputs.shape)}). For {first_dim} batches pass `TBPTTCallback(time_dim={time_dim})`; for"
                f" {other_dim} batches construct the module with `batch_first={not module.batch_first}`."
            )
        if state is not None:
            self._check_rows(name, module, inputs.shape[batch_dim], state)

    def _check_rows(self, name: str, module: nn.Module, rows: int, state: Any) -> None:
        dim = self._batch_dims[name]
        tensors: list[Tensor] = []
        apply_to_collection(state, Tensor, tensors.append)
        if dim is None or not tensors or tensors[0].dim() <= dim or tensors[0].shape[dim] == rows:
            return
        raise ModelError(
            f"Expected the recurrent module `{name}` ({type(module).__name__}) to be called on the"
            f" {tensors[0].shape[dim]} rows (sequences) whose state the previous segment left, but it got an input of"
            f" {rows} rows: the rows of a batch changed between its segments. To drop the rows of finished sequences,"
            " let the callback do it"
            " (`TBPTTCallback(lengths=..., drop_finished=True)`), which drops them from the carried state too; else"
            f" pass `exclude_modules=[{name!r}]` to let the module start from zeros in every segment."
        )

    def _run_pieces(
        self,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        argument: str | None,
        state: Any,
        splits: _Splits,
    ) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
        """Run the call up to the segment's last cut piece by piece, zeroing the rows that start anew between pieces.

        Returns the arguments of the call that computes the last piece (with its state left out) and the state it
        starts from. The outputs of the earlier pieces are kept and joined to the last piece's output in
        :meth:`_capture`. Every other argument that has the segment's time steps (e.g. a per-step mask) is cut into
        the same pieces.
        """
        spec = self.specs[name]
        by_keyword = not args
        input_name = self._input_names[name]
        inputs = kwargs.get(input_name) if by_keyword else args[0]
        time_dim = self._time_dims[name]
        if not isinstance(inputs, Tensor) or inputs.dim() <= time_dim or inputs.shape[time_dim] != splits.length:
            got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ModelError(
                f"Cannot split the call of `{name}` ({type(module).__name__}) inside a segment (where a sequence starts"
                " anew, or with `stride` where the next window starts): expected its input to be a tensor with the"
                f" segment's {splits.length} time steps along dimension {time_dim} but got {got}. Call the recurrent"
                " module on the segment's time steps (padded, not packed), or start new sequences only at batch"
                " boundaries and do not set `stride`."
            )
        if spec.output is None:
            raise ModelError(
                f"Cannot split the call of `{name}` ({type(module).__name__}) inside a segment (where a sequence starts"
                " anew, or with `stride` where the next window starts): its state spec gives no `output`, so the"
                " outputs of the pieces cannot be joined. Give the spec the path of the sequence output in what"
                " the module returns, or start new sequences only at batch boundaries and do not set `stride`."
            )
        state_key = spec.state_in if isinstance(spec.state_in, str) else argument
        rest = {
            key: value for key, value in kwargs.items() if key != state_key and not (by_keyword and key == input_name)
        }

        def cut(value: Any, start: int, stop: int) -> Any:
            if isinstance(value, Tensor) and value.dim() > time_dim and value.shape[time_dim] == splits.length:
                return value.narrow(time_dim, start, stop - start)
            return value

        def piece(start: int, stop: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
            """The call's arguments for steps ``start`` to ``stop``, its state left out (a positional slot kept)."""
            piece_kwargs = {key: cut(value, start, stop) for key, value in rest.items()}
            if by_keyword:
                return (), {input_name: cut(inputs, start, stop), **piece_kwargs}
            return (cut(inputs, start, stop), *(cut(value, start, stop) for value in args[1:])), piece_kwargs

        outputs: list[Tensor] = []
        start = 0
        for stop, rows, carried in splits.cuts:
            piece_args, piece_kwargs = spec.give_state(*piece(start, stop), argument, state)
            returned = module.forward(*piece_args, **piece_kwargs)
            outputs.append(spec.output_of(returned, name))
            state = spec.state_of(returned, name)
            if carried:
                self._captured[name] = state
            if rows is not None:
                state = self._zero_rows(name, state, rows)
            start = stop
        self._pieces[name] = (outputs, time_dim)
        last_args, last_kwargs = piece(start, splits.length)
        return last_args, last_kwargs, state

    def _capture(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not self._active:
            return None
        if name in self._cells:  # a cell returns its new state (``h``, or ``(h, c)``)
            calls = self._calls[name] = self._calls.get(name, 0) + 1
            splits = self._splits
            if name not in self._captured:
                self._pending[name] = output
            if splits is not None and splits.carry_at == calls:
                self._captured[name] = output  # the next window starts here: carry the state after this step
            return None
        self._calls[name] = self._calls.get(name, 0) + 1
        spec = self.specs[name]
        if name not in self._given and (not isinstance(output, tuple) or len(output) != 2):
            raise ModelError(
                f"Expected the recurrent module `{name}` ({type(module).__name__}) to return `(output, new_state)` but"
                f" got {type(output).__name__}. Return a pair from its forward, say where its state is"
                f" (`TBPTTCallback(recurrent_modules={{{name!r}: 'IN -> OUT'}})`, see `StateSpec`), or remove"
                f" {name!r} from `TBPTTCallback(recurrent_modules=...)`."
            )
        self._pending[name] = self._captured.pop(name, spec.state_of(output, name))
        if spec.output is not None and name not in self._pieces and self._calls[name] == 1:
            spec.output_of(output, name)  # (a wrong path found at the first call, not at the first split)
        if name in self._pieces:
            outputs, time_dim = self._pieces.pop(name)
            return spec.with_output(output, torch.cat([*outputs, spec.output_of(output, name)], dim=time_dim))
        return None
