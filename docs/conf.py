"""Sphinx configuration: the optax_graddrop documentation site.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The two notebooks are copied from ``notebooks/`` and executed during the
build (myst-nb), so the site never shows stale outputs.
"""

from __future__ import annotations

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optax_graddrop  # noqa: E402

project = "optax_graddrop"
author = "The optax_graddrop authors"
copyright = "2026, The optax_graddrop authors"
release = optax_graddrop.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_nb",
]

# Cross-references must resolve. Without network access at build time there
# is no intersphinx, so names from JAX, Optax, Flax, NumPy and the standard
# library in signatures are left unlinked rather than reported.
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|optax|flax|numpy|np|jnp|chex|collections|typing|types)(\..*)?"),
  (r"py:.*", r"(Any|Callable|Sequence|NamedTuple|Literal|Array|KeepFn|Keep|Marginalize)"),
  (r"py:class", r"(int|float|bool|str|tuple|list|dict|None|optional|callable|array)"),
  (r"py:class", r"(Params|Updates|GradientTransformation.*|Aggregator|PyTree|PRNGKey)"),
]

autosummary_generate = True
templates_path = ["_templates"]
autodoc_typehints = "none"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True

html_theme = "sphinx_book_theme"
html_title = "optax_graddrop"
html_theme_options = {"show_toc_level": 2}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header"]


def _copy_notebooks(app) -> None:
  """The notebooks live in notebooks/ (for Colab); the site renders copies."""
  target = pathlib.Path(app.srcdir) / "_notebooks"
  target.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, target / notebook.name)


def setup(app) -> None:
  app.connect("builder-inited", _copy_notebooks)
