"""Sphinx configuration of the lightning-tbptt documentation (MyST Markdown pages, API reference from docstrings).

Build strictly, with no network access needed:

    sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import lightning_tbptt

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
autodoc_default_options = {"show-inheritance": False}

html_theme = "alabaster"
html_title = f"lightning-tbptt {release}"
html_static_path: list[str] = []
