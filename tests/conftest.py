"""Shared fixtures: a seeded RNG and realistic (ReLU) layer activations; one
compilation cache for the whole test run."""

import os
import shutil
import tempfile

import numpy as np
import pytest

# Compilation, not training, dominates the slow tests, and most of them compile
# the same small programs again (the digits job, once per CLI subprocess and
# per test). One persistent XLA cache for the run, set before JAX is imported,
# serves the tests and every subprocess they start (they inherit the
# environment). Each run starts it empty, in a new temporary directory, so no
# run reads another's executables; a cached executable is the one a compile
# would give, so no result depends on it. A cache dir set by the caller is
# used as is.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
      prefix="ot_transfer_jax_tests_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The tests run on the CPU (the simulated devices too): no probing for others
# in every process, unless the caller chose a platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The programs compiled once are mostly run for a few steps: without LLVM's
# optimisation passes the CPU compiles them faster (two compile-bound tests
# took 45 % less: 122 -> 68 s). Tests check behaviour and tolerances, not speed; the
# experiments' and benchmarks' own commands keep XLA's defaults.
_FAST_COMPILE = ("--xla_backend_optimization_level=0",
                 "--xla_llvm_disable_expensive_passes=true")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), *_FAST_COMPILE]).strip()


def pytest_collection_modifyitems(config, items):
  """Files with slow tests first, each file's tests kept together (module
  fixtures are built once) and in order: pytest-xdist's workers then end
  together instead of one running a minutes-long test alone at the end."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # Not an xdist worker.
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def layer_pair(rng):
  """Factory of (student, teacher) ReLU activations of one mini-batch.

  Both layers read the same low-dimensional latent of the same examples, so
  their neurons are correlated as in real networks; student neurons are noisy
  copies of random teacher neurons, so OT has near-ties to resolve.

  Returns ``make(batch, n_s, n_t, positions=()) -> (student, teacher)`` with
  shapes ``(batch, *positions, n)``, float32.
  """

  def make(batch, n_s, n_t, positions=(), latent=20, noise=0.5):
    z = rng.normal(size=(batch, *positions, latent))
    w_t = rng.normal(size=(latent, n_t))
    w_s = w_t[:, rng.integers(0, n_t, n_s)]
    teacher = np.maximum(z @ w_t, 0.0)
    student = np.maximum(
        z @ w_s + noise * rng.normal(size=(batch, *positions, n_s)), 0.0)
    return student.astype(np.float32), teacher.astype(np.float32)

  return make


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
  """A digits 0-4 teacher (transfer.py:data=digits's), trained once per session."""
  from experiments import loop
  from digits_job import tiny_config
  path = tmp_path_factory.mktemp("teacher")
  loop.ensure_teacher(tiny_config(path), str(path))
  return path


@pytest.fixture(scope="session")
def digits_run(teacher_dir, tmp_path_factory):
  """A finished run of ``tiny_config(teacher_dir)`` (20 steps, checkpoints at
  steps 10 and 20), trained once per session. Tests read it, or copy it
  before changing anything in it."""
  from experiments import loop
  from digits_job import tiny_config
  path = tmp_path_factory.mktemp("digits_run")
  loop.train_and_evaluate(tiny_config(teacher_dir), str(path))
  return path
