"""Sphinx configuration of the lightning-tbptt documentation (MyST Markdown pages, API reference from docstrings).

Build strictly, with no network access needed:

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import dataclasses
import re
import sys
from typing import Any

import lightning_tbptt
import lightning_tbptt.data
import lightning_tbptt.errors

PUBLIC_MODULES = (lightning_tbptt, lightning_tbptt.data, lightning_tbptt.errors)

project = "lightning-tbptt"
author = "lightning-tbptt contributors"
copyright = "lightning-tbptt contributors"
release = lightning_tbptt.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: `#`-anchored links to headings (e.g. `benchmarks.md#overlapping-windows`) resolve to the heading's slug
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Google style docstrings only; the class docstring documents the constructor's arguments
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autoclass_content = "class"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# base classes are shown (exceptions derive from built-ins that `except` clauses catch), but not the library's internal
# ones: `process_bases` below drops them, and those of Lightning and torchmetrics that it names by their public path
autodoc_default_options = {"show-inheritance": True}
autodoc_inherit_docstrings = False
# defaults as written in the source (`stages=("validate", "test", "predict")`), not as their repr
autodoc_preserve_defaults = True
# the page's table of contents names members without their class (`split_batch()`, not `TBPTTCallback.split_batch()`)
toc_object_entries_show_parents = "hide"

# no intersphinx: its inventories would be downloaded at build time, and the build needs no network. References to
# Lightning, torch or torchmetrics objects render as code, not links; `nitpicky` stays off so they raise no warning.

# Furo: light, dark and automatic (the system's) colour schemes with a toggle; `_static/custom.css` widens the page so
# that the option comments of the code blocks (lines of up to 120 characters) show unclipped in a 1600 px window
html_theme = "furo"
html_title = f"lightning-tbptt {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# copy buttons on code blocks copy the commands without their prompts (`$ `, `>>> `, `... `) and without output lines
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
copybutton_remove_prompts = True
copybutton_exclude = ".linenos, .gp, .go"


def public_path(cls: type) -> str:
    """The shortest import path of a class (``pytorch_lightning.Callback`` rather than its defining module)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        if parts[:end] == ["lightning"]:
            continue  # `lightning.Callback` is `lightning.pytorch.Callback`, the name Lightning's docs use
        module = sys.modules.get(".".join(parts[:end]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{module.__name__}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def is_public(cls: type) -> bool:
    """Whether a class of the library is documented: in ``lightning_tbptt.__all__`` or defined in a public module."""
    return cls.__qualname__ in lightning_tbptt.__all__ or cls.__module__ in {m.__name__ for m in PUBLIC_MODULES[1:]}


def shown_bases(bases: list[Any]) -> list[Any]:
    """The bases to show: an internal base of the library (``CallbackBase``) stands for its own bases; no ``object``."""
    shown: list[Any] = []
    for base in bases:
        if base is object:
            continue
        if not isinstance(base, type) or base.__module__ in {"builtins", "typing"}:
            shown.append(base)  # ``ValueError``, or a generic alias such as ``IterableDataset[dict[str, Tensor]]``
        elif base.__module__.split(".")[0] == "lightning_tbptt":
            shown.extend([base] if is_public(base) else shown_bases(list(base.__bases__)))
        else:
            shown.append(f"``{public_path(base)}``")  # no link: without intersphinx, Lightning's classes are code
    return shown


def process_bases(app: Any, name: str, obj: Any, options: Any, bases: list[Any]) -> None:
    """Handle ``autodoc-process-bases``: the bases of a class as :func:`shown_bases` gives them."""
    bases[:] = shown_bases(bases)


def factory_default(field: Any) -> str:
    """How a dataclass field made by ``default_factory`` shows in a signature: its value, when that reads well."""
    try:
        shown = repr(field.default_factory())
    except Exception:
        return "..."
    return shown if len(shown) <= 40 and " at 0x" not in shown else "..."


def process_signature(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, annotation: str | None
) -> tuple[str | None, str | None] | None:
    """Defaults that have no readable repr (``<factory>``, ``<function <lambda>>``) show as their value or ``...``."""
    if not signature:
        return None
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        for field in dataclasses.fields(obj):
            if field.default_factory is not dataclasses.MISSING:
                signature = signature.replace(f"{field.name}=<factory>", f"{field.name}={factory_default(field)}")
    signature = re.sub(r"<function [\w.]*(?:<lambda>)?>|<object object at 0x[0-9a-f]+>", "...", signature)
    return signature, annotation


def setup(app: Any) -> None:
    """Connect the handlers above to autodoc."""
    app.connect("autodoc-process-bases", process_bases)
    app.connect("autodoc-process-signature", process_signature)
