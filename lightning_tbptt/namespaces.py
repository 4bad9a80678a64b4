"""Both Lightning namespaces: ``pytorch_lightning`` (a dependency) and ``lightning.pytorch`` (the ``lightning`` extra).

They are the same code under two names, with distinct classes. Before Lightning 2.6 a ``Trainer`` refuses a callback of
the other namespace (``ValueError: Expected a parent`` at ``Trainer(...)``), and its ``is_overridden`` checks compare
code objects, some of which differ between the namespaces (the ``pytorch_lightning`` copy rewrites docstrings, e.g. of
the ``*_dataloader`` hooks; with the two packages at different releases, line numbers differ too). So the library's
Lightning classes derive from the classes of *every* installed namespace, and whatever compares hooks asks the
namespace of the object at hand.
A ``LightningModule`` and its ``Trainer`` always share a namespace: Lightning itself refuses a module of the other one
(``TypeError: `model` must be a `LightningModule` ...``).
"""

import importlib
import sys
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lightning_utilities.core.rank_zero as rank_zero
from lightning_utilities.core.overrides import is_overridden as _is_overridden
from packaging.version import Version


def _import(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _import_namespaces() -> tuple[ModuleType, ...]:
    # Importing a namespace points Lightning's shared rank-zero logger (and deprecation category) at that namespace.
    # Keep them where the namespace imported first left them: the user's, or else `pytorch_lightning`'s.
    names = ("pytorch_lightning", "lightning.pytorch")
    first_imported = any(name in sys.modules for name in names)
    saved: dict[str, Any] = {}
    namespaces = []
    for name in names:
        module = _import(name)
        if module is None:
            continue
        namespaces.append(module)
        if not saved:
            saved = {attribute: getattr(rank_zero, attribute, None) for attribute in _RANK_ZERO_ATTRIBUTES}
    if first_imported:
        saved = _before
    for attribute, value in saved.items():
        if value is not None:
            setattr(rank_zero, attribute, value)
    return tuple(namespaces)


_RANK_ZERO_ATTRIBUTES = ("log", "rank_zero_deprecation_category")
_before = {attribute: getattr(rank_zero, attribute, None) for attribute in _RANK_ZERO_ATTRIBUTES}
NAMESPACES: tuple[ModuleType, ...] = _import_namespaces()
"""The importable namespaces, ``pytorch_lightning`` first."""
if not NAMESPACES:
    raise ImportError(
        "lightning-tbptt needs PyTorch Lightning 2.1 or newer, as the package `lightning` (`import lightning.pytorch`)"
        " or `pytorch-lightning` (`import pytorch_lightning`), and found neither (a requirement skipped or removed)."
        " Install it again: `pip install 'pytorch-lightning>=2.1,!=2.6.2,!=2.6.3'`, or `'lightning-tbptt[lightning]'`."
    )


def _combined(name: str, bases: tuple[type, ...]) -> type:
    return bases[0] if len(bases) == 1 else type(name, bases, {"__module__": __name__})


if TYPE_CHECKING:
    from pytorch_lightning import Callback as CallbackBase
    from pytorch_lightning import LightningDataModule as DataModuleBase
else:
    CallbackBase = _combined("CallbackBase", tuple(namespace.Callback for namespace in NAMESPACES))
    DataModuleBase = _combined("DataModuleBase", tuple(namespace.LightningDataModule for namespace in NAMESPACES))


is_param_in_hook_signature: Callable[..., bool] = importlib.import_module(
    f"{NAMESPACES[0].__name__}.utilities.signature_utils"
).is_param_in_hook_signature
"""Lightning's own test of whether a hook takes a parameter (the first namespace's; both have the same code)."""


def namespace_of(obj: Any) -> ModuleType:
    """Return the namespace of a ``Trainer``, ``LightningModule`` or ``LightningDataModule`` of one namespace.

    Raises:
        TypeError: If ``obj`` is none of these.

    """
    for namespace in NAMESPACES:
        if isinstance(obj, (namespace.Trainer, namespace.LightningModule)):
            return namespace
    for namespace in NAMESPACES:
        # the library's own datamodules derive from every namespace: the first match is as good as any
        if isinstance(obj, namespace.LightningDataModule):
            return namespace
    raise TypeError(f"Expected a Lightning Trainer, LightningModule or LightningDataModule but got {type(obj)}.")


def lightning_version(trainer: Any) -> Version:
    """The release of the namespace ``trainer`` comes from (the two packages may be installed at different ones)."""
    return Version(namespace_of(trainer).__version__)


def is_overridden(name: str, instance: Any, trainer: Any) -> bool:
    """Whether the ``LightningModule`` or ``LightningDataModule`` ``instance`` overrides the hook ``name``.

    Compared with the base class of ``trainer``'s namespace, as that ``Trainer`` does.
    """
    namespace = namespace_of(trainer)
    is_module = any(isinstance(instance, each.LightningModule) for each in NAMESPACES)
    parent = namespace.LightningModule if is_module else namespace.LightningDataModule
    return _is_overridden(name, instance, parent)


def default_hook(datamodule: Any, name: str) -> Any:
    """The default hook ``name`` of ``LightningDataModule`` in the namespace of ``datamodule``'s ``Trainer``.

    Before a ``Trainer`` is attached: the first namespace's.
    """
    trainer = vars(datamodule).get("trainer")
    namespace = NAMESPACES[0] if trainer is None else namespace_of(trainer)
    return getattr(namespace.LightningDataModule, name)


class TrainerDefault:
    """A class attribute standing for a ``LightningDataModule`` hook that the class does not implement.

    It resolves to the default hook of the namespace of the datamodule's ``Trainer``, so that either ``Trainer`` sees
    the hook as not overridden (a class deriving from both namespaces would otherwise inherit the first namespace's
    default, which the other namespace's ``Trainer`` takes for an override and calls).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return getattr(NAMESPACES[0].LightningDataModule, self.name)
        return default_hook(obj, self.name).__get__(obj, owner)
