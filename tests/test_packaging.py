"""The library installs and imports without the experiment stack.

The core requirements (pyproject.toml and the installed metadata) name none of
the experiment tools, and every module of the package (pkgutil.walk_packages)
imports, and the README's examples run, in a process where those tools cannot
be imported at all: from the checkout (fast) and from a ``pip install``-ed copy
(slow).
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib

import pytest

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
# Imports every module of the package found by pkgutil.walk_packages (from
# wherever ``ot_transfer_jax`` is imported: the checkout, or an installed copy)
# and prints their names.
_IMPORT_ALL = textwrap.dedent("""
    import importlib, pkgutil

    import ot_transfer_jax

    names = [m.name for m in pkgutil.walk_packages(ot_transfer_jax.__path__,
                                                   "ot_transfer_jax.")]
    for name in names:
      importlib.import_module(name)
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
    print("imported", ot_transfer_jax.__file__, *names)
""")
_BLOCKED_RUN = _ABSENT + _IMPORT_ALL + textwrap.dedent("""
    sys.path.insert(0, "tests")
    from doc_support import run_block  # README.md and docs/*.md

    for heading in sys.argv[2:]:
      namespace = run_block(heading)
      losses_ = namespace["losses"]
      assert losses_[-1] < 0.8 * losses_[0], (heading, losses_[0], losses_[-1])
      print("ran", heading, "loss", losses_[0], "->", losses_[-1])
    loaded = sorted({m.partition(".")[0] for m in sys.modules} & BLOCKED)
    assert not loaded, loaded
""")

# The optax example (README.md) and the NNX one (docs/usage.md).
README_EXAMPLES = ("## Use the regulariser", "### Flax NNX")
# Every module the package must hold (a new module is added here).
PACKAGE_MODULES = {
    "ot_transfer_jax._validation", "ot_transfer_jax.batched_sinkhorn",
    "ot_transfer_jax.checkpoint", "ot_transfer_jax.collectives",
    "ot_transfer_jax.delta_weights", "ot_transfer_jax.inference",
    "ot_transfer_jax.features", "ot_transfer_jax.losses", "ot_transfer_jax.ot",
    "ot_transfer_jax.optim", "ot_transfer_jax.parallel",
    "ot_transfer_jax.regularizers", "ot_transfer_jax.train",
    "ot_transfer_jax.models", "ot_transfer_jax.models.cifar_resnet",
    "ot_transfer_jax.models.digits", "ot_transfer_jax.models.layers",
    "ot_transfer_jax.models.resnet", "ot_transfer_jax.models.small_cnn",
    "ot_transfer_jax.models.vit", "ot_transfer_jax.models.wrn"}
_BLOCKED = ",".join(set(EXPERIMENT_TOOLS.values()) | {"experiments"})


def _imported(stdout: str) -> set:
  line = next(l for l in stdout.splitlines() if l.startswith("imported "))
  return set(line.split()[2:])


@pytest.mark.slow
def test_installed_package_imports_every_module_without_experiment_tools(
    tmp_path):
  """``pip install .`` of a copy of the checkout into its own directory, then
  every module of the *installed* copy (the built wheel's files, not the
  checkout) imports with the extras unimportable. The core dependencies are
  this interpreter's (no download)."""
  source, target = tmp_path / "source", tmp_path / "site"
  shutil.copytree(REPO / "ot_transfer_jax", source / "ot_transfer_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(REPO / name, source / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                  "--no-deps", "--no-build-isolation", "--no-index",
                  "--target", str(target), str(source)],
                 check=True, timeout=600, cwd=tmp_path)
  proc = subprocess.run([sys.executable, "-c", _ABSENT + _IMPORT_ALL, _BLOCKED],
                        cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": str(target)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"imported {target}" in proc.stdout, proc.stdout  # not the checkout
  assert _imported(proc.stdout) == PACKAGE_MODULES, proc.stdout


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_core_imports_and_readme_examples_run_without_experiment_tools():
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKED_RUN, _BLOCKED, *README_EXAMPLES],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Every module of the checkout's package imported, then the examples ran.
  assert _imported(proc.stdout) == PACKAGE_MODULES, proc.stdout
  for heading in README_EXAMPLES:
    assert f"ran {heading}" in proc.stdout


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


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_importing_the_package_defers_ott_jax_and_its_solvers():
  # ott-jax pulls in jaxopt and scipy.optimize (seconds of import time); the
  # package imports it only when a solve runs.
  script = ("import sys, ot_transfer_jax; "
            "print([m for m in ('ott', 'jaxopt', 'scipy.optimize') "
            "if m in sys.modules]); "
            "ot_transfer_jax.ot_regularizer([[1.0, 0.0], [0.0, 1.0]], "
            "[[0.0, 1.0], [1.0, 0.0]]); print('ott' in sys.modules)")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:2] == ["[]", "True"], proc.stdout


@pytest.mark.slow
def test_api_reference_builds_from_the_docstrings_without_warnings(tmp_path):
  """docs/api (Sphinx autodoc + napoleon, Google-style docstrings) builds
  with warnings as errors, with a page entry for every module of the package
  and every public name."""
  import ot_transfer_jax
  out = tmp_path / "html"
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E", "-b",
       "html", str(REPO / "docs" / "api"), str(out)],
      cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  html = "".join(p.read_text() for p in out.glob("*.html"))
  for module in PACKAGE_MODULES:  # A new module needs its automodule.
    assert f'id="module-{module}"' in html, module
  for name in ot_transfer_jax.__all__:
    assert re.search(rf'id="ot_transfer_jax\.[\w.]+\.{name}"', html), name


@pytest.mark.slow
def test_wheel_and_sdist_build_and_the_wheel_installs_in_a_fresh_venv(
    tmp_path):
  """``python -m build`` on a copy of the checkout (``--no-isolation``:
  setuptools comes from this environment instead of a download) gives a
  wheel and an sdist of ot_transfer_jax.__version__; the wheel installs
  (``--no-deps``) into a new venv that sees this environment's jax etc.
  (``--system-site-packages``), where the package imports from the venv,
  reports its version and runs the regulariser."""
  import ot_transfer_jax
  version = ot_transfer_jax.__version__
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  assert "version" in project["dynamic"]  # One place: __version__.
  source, dist = tmp_path / "source", tmp_path / "dist"
  shutil.copytree(REPO / "ot_transfer_jax", source / "ot_transfer_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):
    shutil.copy(REPO / name, source / name)
  subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir",
                  str(dist), str(source)], check=True, capture_output=True,
                 timeout=600, cwd=tmp_path)
  wheel = dist / f"ot_transfer_jax-{version}-py3-none-any.whl"
  sdist = dist / f"ot_transfer_jax-{version}.tar.gz"
  assert sorted(dist.iterdir()) == sorted([wheel, sdist])
  with tarfile.open(sdist) as tar:
    names = tar.getnames()
  for member in ("pyproject.toml", "ot_transfer_jax/ot.py",
                 "ot_transfer_jax/models/vit.py"):
    assert f"ot_transfer_jax-{version}/{member}" in names, member
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                  str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps",
                  "--no-index", str(wheel)], check=True, timeout=300)
  script = ("import importlib.metadata as md, ot_transfer_jax as o; "
            "print(o.__file__, o.__version__, md.version('ot_transfer_jax'), "
            "float(o.ot_regularizer([[1.0, 0.0], [0.0, 1.0]], "
            "[[0.0, 1.0], [1.0, 0.0]])))")
  proc = subprocess.run([python, "-c", script], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  where, *versions, omega = proc.stdout.split()
  assert where.startswith(str(venv)), where  # The wheel, not the checkout.
  assert versions == [version, version]
  assert float(omega) >= 0.0
