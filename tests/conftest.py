"""Shared fixtures: a seeded RNG and realistic (ReLU) layer activations."""

import numpy as np
import pytest


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
  """A digits 0-4 teacher (digits_transfer's), trained once per session."""
  from experiments import loop
  from digits_job import tiny_config
  path = tmp_path_factory.mktemp("teacher")
  loop.ensure_teacher(tiny_config(path), str(path))
  return path
