"""Sphinx configuration of the API reference (built from the docstrings).

  python -m sphinx -W --keep-going -b html docs/api docs/api/_build

``tests/test_packaging.py`` builds it like this (warnings are errors).
"""

import os
import sys

# The checkout's package, whatever is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__),
                                                "..", "..")))
import ot_transfer_jax  # noqa: E402

project = "ot_transfer_jax"
release = version = ot_transfer_jax.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
# The docstrings are Google style (Args:, Returns:, Raises:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields: the dataclass fields are documented once.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Type hints name third-party classes (jax.Array, flax modules, optax
# transformations) that this reference does not document.
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
