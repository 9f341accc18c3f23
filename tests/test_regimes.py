"""experiments/configs/regimes.py: the studies' protocol and the no-matching control."""

import jax
import numpy as np
import pytest

from experiments import terms
from experiments.configs import common, regimes
from ot_transfer_jax import ot, regularizers


def _options(study, method):
  c = regimes.get_config(f"study={study},method={method}")
  return c, dict(c.loss.terms.ot.options)


@pytest.mark.parametrize("shape_s,shape_t", [((32, 6, 6, 8), (32, 6, 6, 8)),
                                             ((64, 12), (64, 20))])
def test_ot_uniform_plan_is_u_v_transpose(shape_s, shape_t):
  _, options = _options("permutation", "ot_uniform")
  # What the regulariser passes to the solve (not its own options).
  reg = regularizers.get("ot").from_options(**options)
  ks, kt = jax.random.split(jax.random.PRNGKey(0))
  s = jax.nn.relu(jax.random.normal(ks, shape_s))
  t = jax.nn.relu(2 * jax.random.normal(kt, shape_t) + 0.5)
  res = ot.solve_neuron_ot(s, t, problem=reg.problem, sinkhorn=reg.sinkhorn)
  n_s, n_t = shape_s[-1], shape_t[-1]
  # Within 1e-3 of u v^T, relative to each entry.
  np.testing.assert_allclose(np.asarray(res.plan) * n_s * n_t, 1.0, atol=1e-3)
  assert bool(res.converged)
  # So Omega_P is the mean cost: a pull on the layer's moments only.
  np.testing.assert_allclose(res.value, np.mean(res.cost_matrix(s, t)),
                             rtol=1e-3)


def test_controls_differ_from_ot_by_their_option_only():
  _, ot_opts = _options("cross_arch", "ot")
  _, uniform = _options("cross_arch", "ot_uniform")
  _, standardize = _options("cross_arch", "ot_standardize")
  diff = lambda a: {k for k in a if a[k] != ot_opts[k]}
  assert diff(uniform) == {"relative_epsilon"}
  assert diff(standardize) == {"normalize"}
  assert standardize["normalize"] == "standardize"
  # The settings' controls (common.OT_CONTROLS), each weight tuned here.
  for control, options in (("ot_uniform", uniform),
                           ("ot_standardize", standardize)):
    assert common.OT_CONTROLS[control].items() <= options.items()


@pytest.mark.parametrize("study", regimes.STUDIES)
def test_every_study_has_the_control_and_one_decay(study):
  methods = regimes.METHODS[study]
  assert "ot" in methods
  assert any(m.startswith("ot_uniform") for m in methods)
  decays = set()
  for m in methods:
    c = regimes.get_config(f"study={study},method={m}")
    decays.add((c.loss.weight_decay, c.loss.head_decay))
    assert c.teacher_normalization and not c.test_every_eval
    assert c.teacher.job.seed == regimes.TEACHER_SEED
    # Every term the study builds is one the library accepts.
    terms.terms_from_config(c.loss.terms)
  assert len(decays) == 1
  sweep = regimes.get_sweep(f"study={study}")
  for m, (key, grid) in sweep.items():
    c = regimes.get_config(f"study={study},method={m}")
    assert key.startswith("loss.terms.") and key.split(".")[2] in c.loss.terms


def test_unknown_study_is_refused_with_the_choices():
  with pytest.raises(ValueError, match="Unknown study='nope'.*permutation"):
    regimes.get_config("study=nope")


def test_applies_reads_the_trained_teachers_width():
  c = regimes.get_config("study=width,method=feature_matching")
  assert regimes.applies("feature_matching", c)
  with c.unlocked():
    c.model.kwargs.width = 0.25
  assert not regimes.applies("feature_matching", c)
  assert regimes.applies("ot", c)
