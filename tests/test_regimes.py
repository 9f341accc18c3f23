"""experiments/configs/regimes.py: the studies' protocol and the no-matching control."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from experiments import curve, loop, terms
from experiments.configs import common, regimes
from ot_transfer_jax import inference, ot, regularizers


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
    assert c.teacher.job.seed == common.TEACHER_SEED
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


# --- The committed teachers ---------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = sorted(glob.glob(os.path.join(REPO, "docs", "regimes", "teachers",
                                         "*")))


@pytest.mark.parametrize("study", regimes.STUDIES)
def test_every_studys_teacher_is_committed_with_the_records(study):
  # Not under workdirs/ (ignored): a session on another machine would
  # retrain it, and float rounding may give other weights.
  first = next(iter(regimes.get_methods(f"study={study}")))
  c = regimes.get_config(f"study={study},method={first}")
  assert c.teacher.workdir.startswith("docs/regimes/teachers/")


def test_some_teacher_is_committed():
  assert {"small_cnn", "small_cnn_width2_6000"} <= set(
      map(os.path.basename, TEACHERS))


@pytest.mark.parametrize("tdir", TEACHERS, ids=os.path.basename)
def test_a_committed_teacher_restores_and_is_the_training_its_studies_list(
    tdir):
  with open(os.path.join(tdir, loop.FINAL_METRICS)) as f:
    final = json.load(f)
  # Its last checkpoint is the step the runs read, and its checksums hold.
  restored = inference.restore(tdir)
  assert restored.step == final["step"]
  # Every study that lists this teacher lists this training last.
  rel = os.path.relpath(tdir, REPO)
  listed = []
  for path in glob.glob(os.path.join(REPO, "docs", "regimes", "*",
                                     curve.TEACHERS)):
    with open(path) as f:
      trainings = json.load(f).get(rel)
    if trainings:
      listed.append(path)
      assert {k: trainings[-1][k] for k in ("step", "test_accuracy",
                                            "best_step",
                                            "test_accuracy_at_best_val")} == {
          k: final[k] for k in ("step", "test_accuracy", "best_step",
                                "test_accuracy_at_best_val")}, path
  assert listed, f"no study lists {rel}"
