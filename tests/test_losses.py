"""Baselines: feature matching, DELTA, AT, FitNets, KD, L2, L2-SP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax import (attention_transfer, delta, feature_matching,
                             fitnets_hint, kd_loss, l2, l2_sp, ot_regularizer)


def test_feature_matching_is_mean_squared_difference(rng):
  s = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  t = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
  assert float(feature_matching(s, t)) == pytest.approx(
      float(np.mean((s - t) ** 2)), rel=1e-5)
  assert float(feature_matching(t, t)) == 0.0


def test_feature_matching_refuses_unequal_widths():
  with pytest.raises(ValueError, match=r"12 neurons and the teacher 10"):
    feature_matching(jnp.ones((4, 12)), jnp.ones((4, 10)))


def test_feature_matching_is_not_permutation_invariant(layer_pair, rng):
  # The contrast with Omega_P: the identity coupling depends on neuron order.
  _, teacher = layer_pair(16, 32, 32)
  student = teacher + 0.1 * rng.normal(size=teacher.shape).astype(np.float32)
  perm = rng.permutation(32)
  aligned = float(feature_matching(student, teacher))
  assert float(feature_matching(student[:, perm], teacher)) > 10 * aligned
  assert float(ot_regularizer(student[:, perm], teacher)) == pytest.approx(
      float(ot_regularizer(student, teacher)), rel=1e-4)


def test_delta_with_uniform_weights_is_feature_matching(layer_pair):
  student, teacher = layer_pair(8, 16, 16, positions=(2, 2))
  uniform = jnp.full((16,), 1 / 16)
  assert float(delta(student, teacher, uniform)) == pytest.approx(
      float(feature_matching(student, teacher)), rel=1e-5)
  one_hot = jnp.zeros(16).at[3].set(1.0)
  expected = np.mean((student[..., 3] - teacher[..., 3]) ** 2)
  assert float(delta(student, teacher, one_hot)) == pytest.approx(
      float(expected), rel=1e-5)
  with pytest.raises(ValueError, match=r"shape \(16,\)"):
    delta(student, teacher, jnp.ones(15))


def test_attention_transfer(rng):
  s = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  t = rng.normal(size=(2, 4, 4, 16)).astype(np.float32)
  # Zero for maps equal up to a positive per-example scale.
  assert float(attention_transfer(s, 3.0 * s)) == pytest.approx(0.0, abs=1e-7)
  value = float(attention_transfer(s, t))
  q = lambda x: (x ** 2).mean(-1).reshape(2, -1)
  qs = q(s) / np.linalg.norm(q(s), axis=1, keepdims=True)
  qt = q(t) / np.linalg.norm(q(t), axis=1, keepdims=True)
  assert value == pytest.approx(float(np.mean((qs - qt) ** 2)), rel=1e-5)
  g = jax.grad(attention_transfer)(jnp.zeros((2, 4, 4, 8)), t)
  assert np.all(np.isfinite(np.asarray(g)))  # dead layer: finite gradient.
  with pytest.raises(ValueError, match=r"\(2, 8\)"):
    attention_transfer(jnp.ones((2, 8)), jnp.ones((2, 8)))


def test_fitnets_hint(rng):
  s = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  t = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
  assert float(fitnets_hint(s, t)) == pytest.approx(
      float(np.mean((s - t) ** 2)), rel=1e-5)
  g_t = jax.grad(fitnets_hint, argnums=1)(s, t)
  assert float(jnp.abs(g_t).sum()) == 0.0  # the teacher is a constant.
  with pytest.raises(ValueError, match="8 channels"):
    fitnets_hint(jnp.ones((2, 4, 4, 4)), jnp.ones((2, 4, 4, 8)))


def test_kd_loss(rng):
  s = jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(5, 10)), jnp.float32)
  assert float(kd_loss(t, t)) == pytest.approx(0.0, abs=1e-6)
  temp = 4.0
  p = jax.nn.softmax(t / temp)
  expected = temp**2 * jnp.mean(
      jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(s / temp)), axis=-1))
  assert float(kd_loss(s, t, temp)) == pytest.approx(float(expected), rel=1e-5)
  assert float(kd_loss(s, t)) > 0
  with pytest.raises(ValueError, match="same label space"):
    kd_loss(s, t[:, :5])


def test_l2_and_l2_sp():
  params = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array([[3.0]])}}
  ref = {"a": jnp.array([1.0, 0.0]), "b": {"c": jnp.array([[1.0]])}}
  head = {"w": jnp.array([2.0])}
  assert float(l2(params)) == pytest.approx(0.5 * 14)
  # alpha/2 (0 + 4 + 4) + beta/2 * 4
  assert float(l2_sp(params, ref, alpha=0.1, head_params=head,
                     beta=0.01)) == pytest.approx(0.05 * 8 + 0.005 * 4)
  g = jax.grad(l2_sp)(params, ref, alpha=0.1)
  np.testing.assert_allclose(g["a"], [0.0, 0.2], rtol=1e-6)
  with pytest.raises(ValueError, match="same structure"):
    l2_sp(params, {"a": ref["a"]})


@pytest.mark.parametrize("fn,args", [
    (feature_matching, ((8, 4, 4, 6), (8, 4, 4, 6))),
    (attention_transfer, ((8, 4, 4, 6), (8, 4, 4, 3))),
    (fitnets_hint, ((8, 4, 4, 6), (8, 4, 4, 6))),
    (kd_loss, ((8, 10), (8, 10))),
])
def test_baselines_jit_vmap_bfloat16(fn, args, rng):
  s, t = (jnp.asarray(rng.normal(size=a), jnp.float32) for a in args)
  ref = float(fn(s, t))
  assert float(jax.jit(fn)(s, t)) == pytest.approx(ref, rel=1e-5)
  out = fn(s.astype(jnp.bfloat16), t.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32
  assert float(out) == pytest.approx(ref, rel=5e-2)
  batched = jax.vmap(fn)(jnp.stack([s, s]), jnp.stack([t, t]))
  np.testing.assert_allclose(batched, [ref, ref], rtol=1e-5)


@pytest.mark.parametrize("fn,shape", [(feature_matching, (4, 2, 2, 3)),
                                      (attention_transfer, (4, 2, 2, 3)),
                                      (fitnets_hint, (4, 2, 2, 3))])
def test_baselines_reject_non_float_and_empty_activations(fn, shape):
  with pytest.raises(ValueError, match=r"dtype int32.*astype\(jnp.float32\)"):
    fn(jnp.ones(shape, jnp.int32), jnp.ones(shape))
  empty = (4, 0, 2, 3)
  with pytest.raises(ValueError, match="empty axis"):
    fn(jnp.ones(empty), jnp.ones(empty))


def test_ot_regularizer_returns_the_solve_on_request(layer_pair):
  # The diagnostics of the solve (converged, n_iters, ...) next to the value,
  # in the (value, aux) form of value_and_grad(..., has_aux=True).
  student, teacher = layer_pair(32, 12, 9)
  value, transport = ot_regularizer(student, teacher, tau=0.999,
                                    return_transport=True)
  assert bool(transport.converged) and int(transport.n_iters) >= 1
  assert transport.plan.shape == (12, 9)
  assert float(value) == float(ot_regularizer(student, teacher, tau=0.999))
  (v, aux), grad = jax.value_and_grad(
      lambda s: ot_regularizer(s, teacher, tau=0.999, return_transport=True),
      has_aux=True)(student)
  assert float(v) == pytest.approx(float(value), rel=1e-6)
  assert int(aux.n_iters) == int(transport.n_iters)
  np.testing.assert_allclose(
      grad, jax.grad(ot_regularizer)(student, teacher, tau=0.999), rtol=1e-6)
  with pytest.raises(ValueError, match="return_transport must be True or"):
    ot_regularizer(student, teacher, return_transport="yes")


def test_usage_convergence_example_runs():
  # docs/usage.md's recipe: tau=0.999 converges under the default budget.
  from doc_support import run_block
  namespace = run_block("### Convergence and compilation")
  transport = namespace["transport"]
  assert bool(transport.converged) and 1 <= int(transport.n_iters) <= 100
  assert namespace["grad"].shape == namespace["student"].shape
