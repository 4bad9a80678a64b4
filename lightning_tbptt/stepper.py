"""Calling a model one step (or one chunk) at a time with its recurrent state carried: :class:`Stepper`.

For sampling from a trained model, or scoring a stream as it arrives: every call of the stepper is one call of the
model, and the state its recurrent modules end with is what they start from at the next call, by the same forward
hooks and state specs the callback trains with (:mod:`lightning_tbptt.state`, :mod:`lightning_tbptt.protocol`), so a
model whose ``forward`` was written for short sequences generates without passing any state.

Example:
    >>> import torch
    >>> lstm = torch.nn.LSTM(3, 4, batch_first=True)
    >>> x = torch.randn(2, 5, 3)
    >>> with Stepper(lstm) as step:
    ...     pieces = [step(x[:, t : t + 1])[0] for t in range(5)]
    ...     carried = step.state["lstm"]
    >>> torch.allclose(torch.cat(pieces, dim=1), lstm(x)[0], atol=1e-6), carried[0].shape
    (True, torch.Size([1, 2, 4]))

"""

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from torch import nn

from lightning_tbptt.errors import ConfigurationError, ModelError
from lightning_tbptt.protocol import StateSpec
from lightning_tbptt.state import CarriedState, StateCarrier, detach_state, find_recurrent_modules


class Stepper:
    """Calls ``model`` with its recurrent state carried from one call to the next.

    Args:
        model: The model (or any module) to call.
        recurrent_modules: Custom recurrent modules to carry, as for :class:`~lightning_tbptt.TBPTTCallback`: names,
            or names mapped to state specs (``""`` names the model itself). ``torch.nn`` RNNs and cells are found by
            themselves.
        exclude_modules: Modules whose state is not carried.
        time_dim: The time dimension of the inputs of custom recurrent modules.
        state: The state to start from (module name -> state, e.g. :meth:`TBPTTCallback.carried_state()
            <lightning_tbptt.TBPTTCallback.carried_state>`); ``None``: zeros.

    Raises:
        ModelError: If ``model`` has no recurrent module to carry.

    The stepper hooks the modules when it is made and unhooks them on :meth:`close` (or at the end of a ``with``
    block). Calls run with gradient unless you wrap them in ``torch.no_grad()``; the state carried is detached.
    """

    def __init__(
        self,
        model: nn.Module,
        recurrent_modules: Sequence[str] | Mapping[str, StateSpec | str | Mapping[str, Any]] = (),
        exclude_modules: Sequence[str] = (),
        time_dim: int = 1,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model
        names = list(recurrent_modules)
        specs = (
            {name: StateSpec.parse(spec, name) for name, spec in recurrent_modules.items()}
            if isinstance(recurrent_modules, Mapping)
            else {}
        )
        available = {name for name, _ in model.named_modules()}
        unknown = [name for name in [*names, *exclude_modules] if name not in available]
        if unknown:
            raise ModelError(
                f"Expected every name in `recurrent_modules` and `exclude_modules` to be a submodule of"
                f" {type(model).__name__} but got {unknown}. Use names as listed by `model.named_modules()`:"
                f" {sorted(available - {''})[:10]}."
            )
        holder = _Holder(model)  # (the model itself may be the recurrent module: it is `holder.model`)
        found = find_recurrent_modules(holder, [_inside(name) for name in names], [_inside(n) for n in exclude_modules])
        if not found:
            raise ModelError(
                f"Expected {type(model).__name__} to have a recurrent module to carry (a `torch.nn` RNN or cell, or"
                " one named in `recurrent_modules`) but found none, so a `Stepper` would carry nothing."
            )
        self._root = type(model).__name__.lower()
        modules = {self._outside(name): module for name, module in found.items()}
        given = {self._outside(_inside(name)): spec for name, spec in specs.items()}
        self._carrier = StateCarrier(modules, time_dim=time_dim, specs=given)
        self._state = CarriedState()
        if state is not None:
            self.set_state(state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model; its recurrent modules start from the state the previous call left."""
        with self._carrier.segment(stream=self._state):
            return self.model(*args, **kwargs)

    @property
    def state(self) -> dict[str, Any]:
        """The state the next call starts from: module name -> state.

        The names are those of ``model.named_modules()``, as in the callback's :meth:`carried_state
        <lightning_tbptt.TBPTTCallback.carried_state>`; a model that is itself the recurrent module (a bare
        ``nn.LSTM``) is named by its class name in lower case (``"lstm"``).
        """
        return dict(self._state.carried)

    def _outside(self, name: str) -> str:
        return self._root if name == "model" else name.removeprefix("model.")

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Start the next call from ``state`` (module name -> state); modules left out keep theirs.

        Raises:
            ConfigurationError: For a module the stepper does not carry.

        """
        unknown = sorted(set(state) - set(self._carrier.modules))
        if unknown:
            raise ConfigurationError(
                f"Expected the states of carried modules, {sorted(self._carrier.modules)}, but got {unknown}."
            )
        for name, value in state.items():
            self._state.carried[name] = detach_state(value)
            self._state.rows[name] = (None, 0)

    def reset(self) -> None:
        """Start the next call from zeros."""
        self._state.clear()

    def close(self) -> None:
        """Unhook the model's modules (the stepper can no longer be called)."""
        self._carrier.remove()

    def __enter__(self) -> "Stepper":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class _Holder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _inside(name: str) -> str:
    """A name of the model's modules as a name of the holder's."""
    return f"model.{name}" if name else "model"
