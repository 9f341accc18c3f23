"""experiments.job on the regime studies' protocol: the teacher's input
statistics and the permuted start, through the real load_teacher and setup.

The permutation study's config with digits (upsampled to 28x28) in place of
Fashion-MNIST, around the committed teacher docs/regimes/teachers/small_cnn.
"""

import os

import jax
import numpy as np
import pytest

from experiments import job
from experiments.configs import regimes
from ot_transfer_jax import inference
from ot_transfer_jax.features import apply_with_features

from digits_job import REPO

# Restores the teacher and sets up two jobs: ~11 s. Full suite only.
pytestmark = pytest.mark.slow

LAYERS = regimes.LAYERS


def _config(**overrides):
  c = regimes.get_config("study=permutation,method=none")
  c.data.name = "digits"  # Offline; the teacher's 28x28 inputs.
  c.data.image_size = 28
  c.data.val_per_class = 20
  c.teacher.workdir = os.path.join(REPO, c.teacher.workdir)
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  # The study's own load path (teacher.source='train', cached and finished).
  return job.load_teacher(_config(), str(tmp_path_factory.mktemp("teacher")))


def _features(j, teacher):
  """``{layer: (student, teacher)}``: the initial student's and the teacher's
  stage features on a validation batch of 64, each ``(points, C)`` (points:
  images x positions)."""
  batch = next(j.eval_batches(j.ds.val, batch_size=64))
  student = jax.device_get(j.initial_state.variables)
  _, fs, _ = apply_with_features(j.model, student, batch["image"], LAYERS,
                                 train=False)
  _, ft, _ = apply_with_features(teacher.model, teacher.variables,
                                 batch["image"], LAYERS, train=False)
  flat = lambda f: np.asarray(f).reshape(-1, f.shape[-1])  # (points, C)
  return {l: (flat(fs[l]), flat(ft[l])) for l in LAYERS}


def _matching(s, t):
  """The teacher channel each student channel equals: ``s``, ``t`` are
  ``(points, C)``; returns the ``(C,)`` match, asserting that each is clear.

  Equal up to 1e-3 of the features' scale max|t|: a permuted start sums in
  another order, ~1e-6 of it on CPU (measured at most 6e-7), more on a GPU
  (TF32). Clear: every other channel is at least 10x that tolerance away
  (measured 0.11 of the scale at the least, stage1), so a loose tolerance
  cannot pass a wrong match.
  """
  tol = 1e-3 * np.abs(t).max()
  # gap[i, k] = max over points |s_i - t_k|, a row at a time: (C, C), never
  # the (points, C, C) array (50 MB a stage here).
  gap = np.stack([np.abs(s[:, [i]] - t).max(0) for i in range(s.shape[1])])
  best, second = np.sort(gap, 1)[:, :2].T
  assert (best <= tol).all(), (best.max(), tol)
  assert (second >= 10 * tol).all(), (second.min(), tol)
  return gap.argmin(1)


def test_teacher_normalization_and_permuted_start(teacher, tmp_path):
  c = _config(init_permuted=True)
  assert c.teacher_normalization and c.init_from_teacher  # The study's.
  j = job.setup(c, str(tmp_path), teacher)
  # (a) The statistics stored with the teacher, not the digits'.
  stored = inference.restore(c.teacher.workdir)
  np.testing.assert_array_equal(j.mean, stored.mean)
  np.testing.assert_array_equal(j.std, stored.std)
  assert not np.allclose(j.std, j.ds.std, rtol=1e-2)  # Else (a) is vacuous.
  # (b) Every stage: the teacher's channels, each once, in another order.
  for layer, (s, t) in _features(j, teacher).items():
    assert s.std(0).min() > 0, layer  # No dead channel: the match is unique.
    perm = _matching(s, t)
    assert sorted(perm) == list(range(t.shape[1])), layer
    assert (perm != np.arange(perm.size)).mean() > 0.5, layer


def test_dataset_normalization_and_unpermuted_start(teacher, tmp_path):
  c = _config(teacher_normalization=False, init_permuted=False)
  j = job.setup(c, str(tmp_path), teacher)
  np.testing.assert_array_equal(j.mean, j.ds.mean)
  np.testing.assert_array_equal(j.std, j.ds.std)
  assert not np.allclose(j.std, teacher.std, rtol=1e-2)
  for layer, (s, t) in _features(j, teacher).items():
    np.testing.assert_allclose(s, t, rtol=1e-5, atol=1e-5, err_msg=layer)
