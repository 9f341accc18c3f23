"""experiments.permutation: a permuted network is the same network, and Omega_P's plan finds the permutation."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import analysis, permutation
from experiments.configs import regimes
from experiments.data import DigitsSource, pipeline
from ot_transfer_jax import inference, models, ot, regularizers, train
from ot_transfer_jax.features import apply_with_features

from digits_job import REPO

LAYERS = ("stage1", "stage2", "stage3")


@pytest.fixture(scope="module")
def network():
  model = models.create_model("small_cnn", 5, width=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 28, 28, 1))
  variables = train.init_model(model, jax.random.PRNGKey(0), x[:1])
  # Non-trivial BatchNorm statistics, so that permuting them matters.
  # (Small: a large shift would kill channels, and dead channels are
  # interchangeable, so no plan could tell them apart.)
  stats = jax.tree_util.tree_map(
      lambda v: v * jax.random.uniform(jax.random.PRNGKey(2), v.shape,
                                       minval=0.8, maxval=1.2),
      variables["batch_stats"])
  return model, {**variables, "batch_stats": stats}, x


def test_permuted_network_computes_the_same_logits(network):
  model, variables, x = network
  perms = permutation.draw(jax.random.PRNGKey(3), variables)
  assert any((p != np.arange(p.size)).any() for p in perms.values())
  permuted = permutation.permute_neurons(variables, perms)
  logits, feats, _ = apply_with_features(model, variables, x, LAYERS, train=False)
  logits_p, feats_p, _ = apply_with_features(model, permuted, x, LAYERS, train=False)
  np.testing.assert_allclose(logits_p, logits, rtol=1e-5, atol=1e-5)
  for layer in LAYERS:  # Other indices, the same neurons.
    np.testing.assert_allclose(feats_p[layer],
                               np.take(np.asarray(feats[layer]), perms[layer], -1),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats_p[layer], feats[layer])


def test_omega_p_plan_recovers_the_permutation(network):
  model, variables, x = network
  perms = permutation.draw(jax.random.PRNGKey(4), variables)
  permuted = permutation.permute_neurons(variables, perms)
  _, feats, _ = apply_with_features(model, variables, x, LAYERS, train=False)
  _, feats_p, _ = apply_with_features(model, permuted, x, LAYERS, train=False)
  for layer in LAYERS:
    # Random-init channels are alike: a sharper plan than the default.
    result = ot.solve_neuron_ot(feats_p[layer], feats[layer],
                                relative_epsilon=1e-3)
    plan = np.asarray(result.plan)
    # Student neuron c is teacher neuron perms[c]: the plan's mass is there
    # (random-init features have near-twins, which share some of it).
    on_perm = plan[np.arange(plan.shape[0]), perms[layer]].sum()
    d = analysis.plan_diagnostics(plan)
    print(layer, on_perm, (plan.argmax(1) == perms[layer]).mean(), d)
    assert on_perm > 0.75
    # Uniform would give 1 / n and 1; the entropic plan blurs a little.
    assert d["row_max_mass"] > 0.75 and d["plan_entropy"] < 0.2
    assert float(result.matched_fraction) < 0.5  # The trace cannot see it.


@pytest.mark.slow  # Restores the teacher, compiles three solves: ~15 s.
def test_omega_p_plan_recovers_the_permutation_of_the_studys_teacher():
  # The permutation study's case: its committed teacher, its solve (default
  # relative_epsilon), a full batch of 50 images normalised as it does.
  # Offline digits, upsampled to the teacher's 28x28, stand in for
  # Fashion-MNIST.
  teacher = inference.restore(os.path.join(REPO, regimes.TEACHER_WORKDIR
                                           .format("small_cnn")))
  source = DigitsSource("train")
  x = teacher.normalize(np.stack([pipeline.fit_image(source[i]["image"], 28)
                                  for i in range(50)]))
  options = regimes.get_config("study=permutation,method=ot").loss.terms.ot
  reg = regularizers.get("ot").from_options(**options.options)
  assert reg.problem.relative_epsilon == ot.DEFAULT_RELATIVE_EPSILON
  perms = permutation.draw(jax.random.PRNGKey(4), teacher.variables)
  permuted = permutation.permute_neurons(teacher.variables, perms)
  _, feats, _ = apply_with_features(teacher.model, teacher.variables, x,
                                    LAYERS, train=False)
  _, feats_p, _ = apply_with_features(teacher.model, permuted, x, LAYERS,
                                      train=False)
  for layer in LAYERS:
    perm = np.asarray(perms[layer])
    # Not the identity, which a plan stuck at the identity would also find.
    assert (perm != np.arange(perm.size)).any(), layer
    result = ot.solve_neuron_ot(feats_p[layer], feats[layer],
                                problem=reg.problem, sinkhorn=reg.sinkhorn)
    plan = np.asarray(result.plan)
    on_perm = plan[np.arange(plan.shape[0]), perm].sum()
    d = analysis.plan_diagnostics(plan)
    # (a) Trained channels are distinct: measured 0.99551 (stage1), 0.99999
    # (stage2), 0.99904 (stage3), the same for each of PRNGKey(0..11)'s
    # permutations (the plan permutes with them), where a wrong permutation
    # puts ~0 there and a blurred plan spreads it (10x relative_epsilon:
    # 0.689 / 0.861 / 0.821, the status page's figures; trace 0 / 0.031 /
    # 0.031 at PRNGKey(4), its fixed points).
    assert on_perm > 0.98, layer
    assert d["row_max_mass"] > 0.98 and d["plan_entropy"] < 0.05, layer
    # (b) The trace sees only the permutation's fixed points: it is their
    # fraction, up to the mass off the permutation (1 - on_perm < 0.02 by
    # (a), with exact marginals). Measured on PRNGKey(0..11): at most 0.0036
    # from it, for fractions 0 to 0.19.
    fixed = (perm == np.arange(perm.size)).mean()
    assert abs(float(result.matched_fraction) - fixed) < 0.02, layer


def test_plan_diagnostics_bounds():
  n = 8
  identity = analysis.plan_diagnostics(np.eye(n) / n)
  assert identity == pytest.approx({"row_max_mass": 1.0, "plan_entropy": 0.0})
  uniform = analysis.plan_diagnostics(np.full((n, 4), 1 / (4 * n)))
  assert uniform == pytest.approx({"row_max_mass": 0.25, "plan_entropy": 1.0})


def test_refuses_what_it_cannot_permute(network):
  _, variables, _ = network
  bad = {**variables, "params": {**variables["params"], "extra": {}}}
  with pytest.raises(ValueError, match="sequential CNNs"):
    permutation.draw(jax.random.PRNGKey(0), bad)
  perms = permutation.draw(jax.random.PRNGKey(0), variables)
  perms["stage1"] = np.zeros_like(perms["stage1"])
  with pytest.raises(ValueError, match="not a permutation"):
    permutation.permute_neurons(variables, perms)
