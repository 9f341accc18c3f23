"""The library installs and imports without the experiment stack.

The core requirements (pyproject.toml and the installed metadata) name none of
the experiment tools, and the core modules import and run the README's
examples in a process where those tools cannot be imported at all.
"""

import importlib.metadata
import pathlib
import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
# Distributions a core install must not pull, and the modules they provide.
EXPERIMENT_TOOLS = {"tensorflow-datasets": "tensorflow_datasets",
                    "grain": "grain", "tensorboard": "tensorboard",
                    "matplotlib": "matplotlib", "scikit-learn": "sklearn",
                    "torch": "torch", "tensorflow": "tensorflow",
                    "pillow": "PIL", "safetensors": "safetensors",
                    "pot": "ot", "pytest": "pytest",
                    "ml-collections": "ml_collections"}
CORE = {"jax", "flax", "optax", "ott-jax", "orbax-checkpoint", "numpy",
        "absl-py"}


def _core_requirements(requirements):
  """Requirements without an ``extra == ...`` marker: what `pip install .` pulls."""
  reqs = [Requirement(r) for r in requirements]
  return [r for r in reqs if r.marker is None or "extra" not in str(r.marker)]


def _check_core(reqs, where):
  names = {canonicalize_name(r.name) for r in reqs}
  assert not names & set(EXPERIMENT_TOOLS), (where, names)
  assert names == CORE, (where, names)
  for r in reqs:
    # A tested lower bound and no upper bound or exact pin, so that projects
    # on newer jax/flax can install the library.
    operators = {spec.operator for spec in r.specifier}
    assert operators == {">="}, (where, str(r))


def test_core_requirements_are_the_jax_stack_with_lower_bounds():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  _check_core(_core_requirements(project["dependencies"]), "pyproject.toml")
  extras = project["optional-dependencies"]
  assert "torch" not in " ".join(extras["test"])
  assert any(r.startswith("torch") for r in extras["torch"])
  assert any(r.startswith("tensorflow-datasets") for r in extras["experiments"])


def test_installed_metadata_matches_pyproject():
  installed = importlib.metadata.requires("ot_transfer_jax") or []
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  assert sorted(map(str, _core_requirements(installed))) == sorted(
      str(Requirement(r)) for r in project["dependencies"]), (
          "the installed package's metadata differs from pyproject.toml: "
          "reinstall with pip install -e '.[experiments,test]' -c constraints.txt")
  _check_core(_core_requirements(installed), "installed metadata")


# Runs in a fresh interpreter: importing any experiment tool raises
# ModuleNotFoundError, as on a machine where only the core is installed.
_ABSENT = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Absent(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, Absent())
""")
_BLOCKED_RUN = _ABSENT + textwrap.dedent("""
    import ot_transfer_jax
    from ot_transfer_jax import (checkpoint, delta_weights, features, losses,
                                 models, ot, regularizers, train)
    from ot_transfer_jax.models import create_model

    sys.path.insert(0, "tests")
    from doc_support import run_block  # README.md and docs/*.md

    for heading in sys.argv[2:]:
      namespace = run_block(heading)
      losses_ = namespace["losses"]
      assert losses_[-1] < 0.8 * losses_[0], (heading, losses_[0], losses_[-1])
      print("ran", heading, "loss", losses_[0], "->", losses_[-1])

    try:
      import ot_transfer_jax.data
    except ImportError as err:
      print("data:", err)
    else:
      raise AssertionError("ot_transfer_jax.data imported without its extra")
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
""")

# The optax example (README.md) and the NNX one (docs/usage.md).
README_EXAMPLES = ("## Use the regulariser", "### Flax NNX")


def test_core_imports_and_readme_examples_run_without_experiment_tools():
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKED_RUN,
       ",".join(set(EXPERIMENT_TOOLS.values()) | {"experiments"}),
       *README_EXAMPLES],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for heading in README_EXAMPLES:
    assert f"ran {heading}" in proc.stdout
  # Importing the data pipelines without their extra says how to get it.
  assert "needs the experiments extra" in proc.stdout
  assert "pip install 'ot_transfer_jax[experiments]'" in proc.stdout


def test_torchvision_weight_tests_skip_without_torch_saying_why():
  code = _ABSENT + (
      "import pytest\n"
      "sys.exit(pytest.main(['-q', '-rs', '-p', 'no:cacheprovider', "
      "'tests/test_pretrained.py', '-k', 'torch']))")
  proc = subprocess.run([sys.executable, "-c", code, "torch"], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "3 skipped" in proc.stdout, proc.stdout[-2000:]
  assert "torch is not installed" in proc.stdout
  assert "pip install -e '.[torch]'" in proc.stdout
