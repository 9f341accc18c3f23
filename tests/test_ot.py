"""The neuron-set OT regulariser: value, invariances, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import ot as pot  # POT, test-only: the exact OT reference.
import pytest
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import sinkhorn

from ot_transfer_jax import ot as ot_module
from ot_transfer_jax import (cost_matrix, feature_matching, neuron_descriptors,
                             ot_regularizer, solve_neuron_ot)


def exact_ot(student, teacher):
  """Exact OT value, computed independently in float64 with POT."""
  a = student.reshape(-1, student.shape[-1]).astype(np.float64)
  t = teacher.reshape(-1, teacher.shape[-1]).astype(np.float64)
  c = ((a[:, :, None] - t[:, None, :]) ** 2).mean(axis=0)
  n_s, n_t = c.shape
  return pot.emd2(np.full(n_s, 1 / n_s), np.full(n_t, 1 / n_t), c)


@pytest.mark.parametrize("n_s,n_t", [(32, 32), (128, 128), (512, 512),
                                     (64, 32), (256, 512), (512, 128)])
def test_default_value_close_to_exact_ot(layer_pair, n_s, n_t):
  student, teacher = layer_pair(64, n_s, n_t)
  res = solve_neuron_ot(student, teacher)
  exact = exact_ot(student, teacher)
  assert bool(res.converged)
  assert abs(float(res.value) - exact) <= 0.05 * exact
  # Entropic OT only ever adds cost to the exact optimum (up to round-off).
  assert float(res.value) >= exact * (1 - 1e-4)


def test_conv_layers_flatten_positions(layer_pair):
  student, teacher = layer_pair(8, 48, 32, positions=(4, 4))
  res = solve_neuron_ot(student, teacher)
  assert res.plan.shape == (48, 32)
  assert res.cost_matrix(student, teacher).shape == (48, 32)
  exact = exact_ot(student, teacher)
  assert abs(float(res.value) - exact) <= 0.05 * exact


def test_plan_has_uniform_marginals(layer_pair):
  student, teacher = layer_pair(32, 40, 24)
  plan = np.asarray(solve_neuron_ot(student, teacher, threshold=1e-5).plan)
  np.testing.assert_allclose(plan.sum(1), np.full(40, 1 / 40), rtol=1e-3)
  np.testing.assert_allclose(plan.sum(0), np.full(24, 1 / 24), rtol=1e-3)


def test_cost_matrix_is_mean_squared_difference(rng):
  a = rng.normal(size=(7, 3, 5)).astype(np.float32)
  t = rng.normal(size=(7, 3, 4)).astype(np.float32)
  da = neuron_descriptors(jnp.asarray(a))
  dt = neuron_descriptors(jnp.asarray(t))
  assert da.shape == (21, 5)
  expected = ((a.reshape(21, 5)[:, :, None] - t.reshape(21, 4)[:, None]) ** 2
              ).mean(0)
  np.testing.assert_allclose(cost_matrix(da, dt), expected, rtol=1e-5,
                             atol=1e-6)


def test_cost_matrix_is_computed_when_asked_from_the_solved_activations(
    layer_pair):
  student, teacher = layer_pair(16, 12, 10, positions=(2, 2))
  res = solve_neuron_ot(student, teacher, normalize="l2", spatial="pool")
  # Not a leaf: an eager solve returns the plan, not a second n_s x n_t.
  assert len(jax.tree_util.tree_leaves(res)) == 9
  want = cost_matrix(neuron_descriptors(student, spatial="pool",
                                        normalize="l2"),
                     neuron_descriptors(teacher, spatial="pool",
                                        normalize="l2"))
  np.testing.assert_allclose(res.cost_matrix(student, teacher), want,
                             rtol=1e-5, atol=1e-6)
  # The pytree stays valid under jit (the options are static), and so does
  # the method inside it.
  inside = jax.jit(lambda s, t: (lambda r: (r, r.cost_matrix(s, t)))(
      solve_neuron_ot(s, t, normalize="l2", spatial="pool")))
  res_jit, cost_jit = inside(student, teacher)
  assert res_jit.comparison == res.comparison
  np.testing.assert_allclose(cost_jit, res.cost_matrix(student, teacher),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="the plan is \\(12, 10\\)"):
    res.cost_matrix(student, teacher[..., :4])


def test_problem_and_sinkhorn_dataclasses_equal_the_keywords(layer_pair):
  student, teacher = layer_pair(16, 12, 10)
  by_keyword = solve_neuron_ot(student, teacher, relative_epsilon=0.02,
                               tau=0.9, threshold=1e-4, anderson=0)
  by_dataclass = solve_neuron_ot(
      student, teacher,
      problem=ot_module.NeuronProblem(relative_epsilon=0.02, tau=0.9),
      sinkhorn=ot_module.SinkhornOptions(threshold=1e-4, anderson=0))
  assert float(by_keyword.value) == float(by_dataclass.value)
  np.testing.assert_array_equal(by_keyword.plan, by_dataclass.plan)
  # A keyword overrides the dataclass's field.
  mixed = solve_neuron_ot(
      student, teacher, problem=ot_module.NeuronProblem(tau=0.5),
      sinkhorn=ot_module.SinkhornOptions(threshold=1e-4, anderson=0),
      relative_epsilon=0.02, tau=0.9)
  assert float(mixed.value) == float(by_keyword.value)
  with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) "
                     r"\['epsilonn'\].*fields of NeuronProblem"):
    ot_regularizer(student, teacher, epsilonn=0.1)
  with pytest.raises(TypeError, match="problem must be an ot.NeuronProblem"):
    solve_neuron_ot(student, teacher, problem={"tau": 0.9})
  with pytest.raises(ValueError, match="tau must lie in"):
    ot_module.NeuronProblem(tau=2.0)
  with pytest.raises(ValueError, match="max_iterations must be an integer"):
    ot_module.SinkhornOptions(max_iterations=0)


def test_permutation_invariance_and_equivariant_gradient(layer_pair, rng):
  student, teacher = layer_pair(32, 96, 96, positions=(2, 2))
  perm = rng.permutation(96)
  grad_fn = jax.value_and_grad(ot_regularizer)
  v, g = grad_fn(jnp.asarray(student), teacher)
  v_p, g_p = grad_fn(jnp.asarray(student[..., perm]), teacher)
  assert abs(float(v_p) - float(v)) <= 1e-4 * abs(float(v))
  scale = float(jnp.max(jnp.abs(g)))
  np.testing.assert_allclose(g_p, np.asarray(g)[..., perm], atol=1e-3 * scale)


def test_teacher_against_itself_matches_everything(layer_pair):
  _, teacher = layer_pair(64, 8, 128)
  res = solve_neuron_ot(teacher, teacher)
  assert float(res.value) <= 0.01 * float(jnp.mean(res.cost_matrix(teacher,
                                                                  teacher)))
  assert float(res.matched_fraction) == pytest.approx(1.0, abs=0.02)


def test_duplicate_neurons_share_mass(layer_pair):
  # Dead (all-zero) neurons compute the same function: the plan cannot tell
  # them apart, so each keeps only 1/k of its mass on itself.
  _, teacher = layer_pair(32, 8, 24)
  teacher[..., :8] = 0.0
  res = solve_neuron_ot(teacher, teacher)
  diag = np.diag(np.asarray(res.plan)) * 24
  np.testing.assert_allclose(diag[8:], 1.0, atol=0.02)
  np.testing.assert_allclose(diag[:8], 1 / 8, atol=0.02)
  assert float(res.matched_fraction) == pytest.approx((16 + 1) / 24, abs=0.02)


def test_ot_never_exceeds_identity_coupling(layer_pair):
  for seed_batch in (16, 64):
    student, teacher = layer_pair(seed_batch, 64, 64)
    res = solve_neuron_ot(student, teacher)
    omega_i = float(feature_matching(student, teacher))
    # Entropic bias: at most eps * log(n) above the exact optimum.
    tolerance = float(res.epsilon) * np.log(64)
    assert float(res.value) <= omega_i + tolerance
    assert float(res.value) < omega_i  # noisy copies: OT finds better pairs.


def test_matched_fraction_nan_for_unequal_widths(layer_pair):
  student, teacher = layer_pair(16, 12, 10)
  assert np.isnan(float(solve_neuron_ot(student, teacher).matched_fraction))


@pytest.mark.parametrize("case", ["dead_neurons", "constant", "tiny", "huge",
                                  "batch_of_one", "both_dead"])
@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_finite_on_degenerate_inputs(layer_pair, case):
  student, teacher = layer_pair(16, 32, 24, positions=(3, 3))
  if case == "dead_neurons":
    student[..., :10] = 0.0
    teacher[..., :5] = 0.0
  elif case == "constant":
    student = np.full_like(student, 0.7)
    teacher = np.full_like(teacher, 0.7)
  elif case == "tiny":
    student, teacher = student * 1e-4, teacher * 1e-4
  elif case == "huge":
    student, teacher = student * 1e4, teacher * 1e4
  elif case == "batch_of_one":
    student, teacher = student[:1, 0, 0], teacher[:1, 0, 0]
  elif case == "both_dead":
    student, teacher = np.zeros_like(student), np.zeros_like(teacher)
  for normalize in ("none", "l2", "standardize"):
    v, g = jax.value_and_grad(ot_regularizer)(
        jnp.asarray(student), teacher, normalize=normalize)
    assert np.isfinite(float(v)), (case, normalize)
    assert np.all(np.isfinite(np.asarray(g))), (case, normalize)
    assert float(v) >= 0.0


def test_scale_only_rescales_the_value(layer_pair):
  student, teacher = layer_pair(16, 32, 24)
  base = float(ot_regularizer(student, teacher))
  for s in (1e-4, 1e4):
    scaled = float(ot_regularizer(student * s, teacher * s))
    assert scaled == pytest.approx(base * s * s, rel=1e-3)


def _entropic_objective(student, teacher, epsilon):
  """The entropic OT objective min_P <P, C> - eps H(P), solved tightly."""
  c = cost_matrix(neuron_descriptors(student), neuron_descriptors(teacher))
  geom = geometry.Geometry(cost_matrix=c, epsilon=epsilon)
  out = sinkhorn.Sinkhorn(threshold=1e-10, max_iterations=20_000)(
      linear_problem.LinearProblem(geom))
  return out.reg_ot_cost


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_envelope_gradient_matches_finite_differences(layer_pair, rng):
  student, teacher = layer_pair(16, 24, 20)
  with jax.enable_x64(True):
    student = jnp.asarray(student, jnp.float64)
    teacher = jnp.asarray(teacher, jnp.float64)
    eps = 0.05 * float(jnp.mean(cost_matrix(neuron_descriptors(student),
                                            neuron_descriptors(teacher))))
    grad = jax.grad(ot_regularizer)(student, teacher, epsilon=eps,
                                    threshold=1e-10, max_iterations=20_000)
    for _ in range(3):
      direction = jnp.asarray(rng.normal(size=student.shape))
      h = 1e-4
      fd = (_entropic_objective(student + h * direction, teacher, eps)
            - _entropic_objective(student - h * direction, teacher, eps)) / (
                2 * h)
      np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(fd),
                                 rtol=1e-4)


def test_gradient_step_lowers_omega(layer_pair):
  student, teacher = layer_pair(32, 64, 48, positions=(2, 2))
  v, g = jax.value_and_grad(ot_regularizer)(jnp.asarray(student), teacher)
  lr = 0.1 / float(jnp.max(jnp.abs(g)))
  assert float(ot_regularizer(student - lr * g, teacher)) < float(v)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_unrolled_derivative_differs_from_envelope(layer_pair):
  student, teacher = layer_pair(16, 48, 40)
  grads = {
      mode: jax.grad(ot_regularizer)(jnp.asarray(student), teacher, grad=mode,
                                     threshold=1e-5)
      for mode in ("envelope", "unroll")
  }
  for g in grads.values():
    assert np.all(np.isfinite(np.asarray(g)))
  rel = float(jnp.linalg.norm(grads["envelope"] - grads["unroll"]) /
              jnp.linalg.norm(grads["unroll"]))
  assert rel > 1e-3  # the plan does move with C: a genuinely different mode.
  # Same forward value whatever the gradient mode.
  values = [float(ot_regularizer(student, teacher, grad=m, threshold=1e-5))
            for m in grads]
  np.testing.assert_allclose(values, values[0], rtol=1e-5)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_jit_vmap_and_bfloat16(layer_pair):
  student, teacher = layer_pair(16, 32, 24, positions=(2, 2))
  ref = float(ot_regularizer(student, teacher))
  jitted = jax.jit(ot_regularizer, static_argnames=("spatial", "normalize"))
  assert float(jitted(student, teacher, spatial="flatten")) == pytest.approx(
      ref, rel=1e-5)
  bf16 = jitted(jnp.asarray(student, jnp.bfloat16),
                jnp.asarray(teacher, jnp.bfloat16))
  assert bf16.dtype == jnp.float32
  assert float(bf16) == pytest.approx(ref, rel=2e-2)
  g16 = jax.grad(ot_regularizer)(jnp.asarray(student, jnp.bfloat16), teacher)
  assert g16.dtype == jnp.bfloat16 and np.all(np.isfinite(
      np.asarray(g16, np.float32)))
  stacked = jax.vmap(ot_regularizer)(
      jnp.stack([student, 2 * student]), jnp.stack([teacher, teacher]))
  assert stacked.shape == (2,)
  assert float(stacked[0]) == pytest.approx(ref, rel=1e-5)
  assert float(stacked[1]) == pytest.approx(
      float(ot_regularizer(2 * student, teacher)), rel=1e-5)


def test_jit_compiles_once_per_shape(layer_pair):
  student, teacher = layer_pair(16, 32, 24)
  traces = []

  @jax.jit
  def f(s, t):
    traces.append(1)
    return ot_regularizer(s, t)

  for k in range(3):
    f(student + k, teacher)
  assert len(traces) == 1


def test_eager_calls_compile_once_per_shape_and_option_set(layer_pair):
  # Outside jit the solve is one cached jax.jit: a second call with the same
  # shapes compiles nothing at all (validation included), new values of
  # epsilon or threshold neither; a new static option compiles it once more.
  student, teacher = layer_pair(16, 7, 5)  # Shapes no other test uses.
  compiles = []

  def on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  solve = ot_module._solve
  first = solve_neuron_ot(student, teacher)
  after_first = solve._cache_size()
  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    again = solve_neuron_ot(student + 1.0, teacher)
    solve_neuron_ot(student, teacher, relative_epsilon=0.02, threshold=1e-4)
    value = ot_regularizer(student, teacher)
    assert compiles == [] and solve._cache_size() == after_first
    solve_neuron_ot(student, teacher, tau=0.9)
    assert solve._cache_size() == after_first + 1 and compiles
    compiles.clear()
    solve_neuron_ot(student * 2.0, teacher, tau=0.9)
    assert compiles == [] and solve._cache_size() == after_first + 1
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert float(value) == float(first.value) != float(again.value)


def test_warm_start_needs_fewer_iterations(layer_pair):
  student, teacher = layer_pair(64, 256, 256)
  cold = solve_neuron_ot(student, teacher)
  moved = student * 1.01
  warm = solve_neuron_ot(moved, teacher, init=cold.potentials)
  again_cold = solve_neuron_ot(moved, teacher)
  assert bool(warm.converged)
  assert int(warm.n_iters) < int(again_cold.n_iters)
  assert float(warm.value) == pytest.approx(float(again_cold.value), rel=1e-2)


def test_annealing_reaches_the_same_plan_in_fewer_iterations(layer_pair):
  student, teacher = layer_pair(64, 256, 128)
  annealed = solve_neuron_ot(student, teacher, relative_epsilon=0.005)
  plain = solve_neuron_ot(student, teacher, relative_epsilon=0.005,
                          anneal=False)
  assert bool(annealed.converged) and bool(plain.converged)
  assert float(annealed.epsilon) == pytest.approx(float(plain.epsilon))
  assert ot_module.ANNEAL_ITERATIONS <= int(annealed.n_iters) < int(
      plain.n_iters)
  assert float(annealed.value) == pytest.approx(float(plain.value), rel=5e-3)


def test_pool_compares_layers_of_different_resolution(layer_pair, rng):
  student, _ = layer_pair(8, 16, 16, positions=(4, 4))
  teacher = np.maximum(rng.normal(size=(8, 2, 2, 24)), 0).astype(np.float32)
  res = solve_neuron_ot(student, teacher, spatial="pool")
  assert res.plan.shape == (16, 24) and np.isfinite(float(res.value))
  dense = np.maximum(rng.normal(size=(8, 24)), 0).astype(np.float32)
  assert np.isfinite(float(ot_regularizer(student, dense, spatial="pool")))


def test_normalize_removes_scale_differences(layer_pair):
  student, teacher = layer_pair(16, 32, 24)
  for normalize in ("l2", "standardize"):
    base = float(ot_regularizer(student, teacher, normalize=normalize))
    scaled = float(ot_regularizer(student * 50, teacher, normalize=normalize))
    assert scaled == pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize("s_shape,t_shape,spatial,fragment", [
    ((8, 16), (4, 16), "flatten", "batch sizes differ"),
    ((8, 4, 4, 16), (8, 16), "flatten", "positions must match"),
    ((8, 4, 4, 16), (8, 2, 2, 16), "flatten", "spatial='pool'"),
    ((16,), (8, 16), "flatten", "(batch, [positions...,] neurons)"),
    ((8, 16), (8, 16), "stretch", "not one of"),
])
def test_bad_shapes_raise_clear_errors(s_shape, t_shape, spatial, fragment):
  with pytest.raises(ValueError) as err:
    ot_regularizer(jnp.ones(s_shape), jnp.ones(t_shape), spatial=spatial)
  msg = str(err.value)
  assert fragment in msg
  if spatial != "stretch":
    assert str(tuple(s_shape)) in msg and str(tuple(t_shape)) in msg


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"epsilon": -1.0},
                                    {"relative_epsilon": 0.0},
                                    {"epsilon": float("nan")}])
def test_non_positive_epsilon_rejected(kwargs):
  with pytest.raises(ValueError, match="must be a positive finite number"):
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 3)), **kwargs)


def test_unknown_grad_mode_rejected():
  with pytest.raises(ValueError, match="grad='implicit' is not one of"):
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 3)), grad="implicit")


@pytest.mark.parametrize("name,value", [
    ("epsilon", np.float32(-1.0)), ("epsilon", jnp.asarray(0.0)),
    ("epsilon", np.float64("nan")), ("epsilon", jnp.inf), ("epsilon", -2),
    ("relative_epsilon", np.float32(0.0)),
    ("relative_epsilon", jnp.asarray(-0.01)),
])
def test_invalid_epsilon_rejected_for_every_scalar_kind(name, value):
  with pytest.raises(ValueError, match=f"{name} must be a positive finite"):
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 3)), **{name: value})


@pytest.mark.parametrize("name,value", [("epsilon", 0.0), ("epsilon", -1.0),
                                        ("epsilon", np.inf),
                                        ("relative_epsilon", 0.0),
                                        ("relative_epsilon", np.nan)])
def test_traced_invalid_epsilon_gives_nan_not_converged(layer_pair, name,
                                                        value):
  student, teacher = layer_pair(8, 6, 5)

  @jax.jit
  def solve(eps):
    res = solve_neuron_ot(student, teacher, **{name: eps})
    return res.value, res.converged

  value_, converged = solve(jnp.float32(value))
  assert np.isnan(float(value_)) and not bool(converged)
  g = jax.jit(jax.grad(lambda s, e: ot_regularizer(s, teacher, **{name: e})))(
      jnp.asarray(student), jnp.float32(value))
  assert np.all(np.isnan(np.asarray(g)))
  # The same function with a valid traced epsilon is fine.
  assert np.isfinite(float(solve(jnp.float32(0.05))[0]))


@pytest.mark.parametrize("kwargs,fragment", [
    ({"epsilon": "0.1"}, "epsilon must be a real number"),
    ({"relative_epsilon": None}, "relative_epsilon must be a real number"),
    ({"epsilon": True}, "epsilon must be a real number"),
    ({"epsilon": jnp.ones(2)}, "epsilon must be a real number (a scalar)"),
    ({"threshold": 0.0}, "threshold must be a positive finite number"),
    ({"threshold": -1e-3}, "threshold must be a positive finite number"),
    ({"threshold": "tight"}, "threshold must be a real number"),
    ({"max_iterations": 0}, "max_iterations must be an integer >= 1"),
    ({"max_iterations": 2.5}, "max_iterations must be an integer >= 1"),
    ({"inner_iterations": 0}, "inner_iterations must be an integer >= 1"),
    ({"anneal": "yes"}, "anneal must be True or False"),
    ({"precision": "fp8"}, "precision='fp8' is not one of"),
    ({"normalize": 1}, "normalize=1 is not one of"),
])
def test_bad_options_raise_clear_errors(kwargs, fragment):
  with pytest.raises(ValueError) as err:
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 3)), **kwargs)
  assert fragment in str(err.value)


def test_init_of_wrong_shapes_names_both():
  s, t = jnp.ones((4, 3)), jnp.ones((4, 5))
  swapped = (jnp.zeros(5), jnp.zeros(3))
  with pytest.raises(ValueError) as err:
    ot_regularizer(s, t, init=swapped)
  msg = str(err.value)
  assert "f (5,) and g (3,)" in msg and "f (3,)" in msg and "g (5,)" in msg
  with pytest.raises(ValueError, match="init must be a pair"):
    ot_regularizer(s, t, init=jnp.zeros(8))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.complex64])
def test_non_float_activations_say_what_to_cast(dtype):
  with pytest.raises(ValueError) as err:
    ot_regularizer(jnp.ones((4, 3), dtype), jnp.ones((4, 3)))
  msg = str(err.value)
  assert f"student activations have dtype {jnp.dtype(dtype)}" in msg
  assert "x.astype(jnp.float32)" in msg
  with pytest.raises(ValueError, match="teacher activations have dtype"):
    ot_regularizer(jnp.ones((4, 3)), np.ones((4, 3), np.int64))


@pytest.mark.parametrize("shape", [(4, 0, 4, 3), (0, 3), (4, 0)])
def test_empty_axis_rejected(shape):
  with pytest.raises(ValueError) as err:
    ot_regularizer(jnp.ones(shape), jnp.ones(shape))
  assert "empty axis" in str(err.value) and str(shape) in str(err.value)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("positions,n_s,n_t", [((), 24, 24), ((), 24, 16),
                                               ((2, 2), 16, 16),
                                               ((2, 2), 16, 12)])
def test_closed_form_gradient_equals_autodiff_envelope(layer_pair, dtype,
                                                       positions, n_s, n_t):
  # The custom VJP's (2/D) sum_k P_jk (a_j - t_k) against autodiff of the
  # previous implementation, <stop_gradient(P), C(a, t)>.
  student, teacher = layer_pair(16, n_s, n_t, positions=positions)
  s, t = jnp.asarray(student, dtype), jnp.asarray(teacher, dtype)
  plan = jax.lax.stop_gradient(solve_neuron_ot(s, t).plan)

  def previous(s):
    return jnp.sum(plan * cost_matrix(neuron_descriptors(s),
                                      neuron_descriptors(t)))

  want = np.asarray(jax.grad(previous)(s), np.float32)
  got = jax.grad(ot_regularizer)(s, t)
  assert got.dtype == dtype
  got = np.asarray(got, np.float32)
  assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_anderson_acceleration_cuts_cold_iterations(layer_pair):
  student, teacher = layer_pair(64, 256, 128)
  fast = solve_neuron_ot(student, teacher, relative_epsilon=0.005)
  plain = solve_neuron_ot(student, teacher, relative_epsilon=0.005,
                          anderson=0)
  assert bool(fast.converged) and bool(plain.converged)
  assert int(fast.n_iters) < int(plain.n_iters)
  assert float(fast.value) == pytest.approx(float(plain.value), rel=5e-3)
  # Same accuracy against the exact optimum.
  exact = exact_ot(student, teacher)
  assert abs(float(fast.value) - exact) <= 0.01 * exact


@pytest.mark.parametrize("value", [-1, 2.5, True, "3"])
def test_bad_anderson_memory_rejected(value):
  with pytest.raises(ValueError, match="anderson must be an integer >= 0"):
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 3)), anderson=value)


def test_bfloat16_cost_gemm_stays_close(layer_pair):
  student, teacher = layer_pair(32, 48, 40, positions=(2, 2))
  fn = jax.value_and_grad(ot_regularizer)
  v, g = fn(jnp.asarray(student), teacher)
  v16, g16 = fn(jnp.asarray(student), teacher, precision="bfloat16")
  assert float(v16) == pytest.approx(float(v), rel=1e-3)
  assert float(jnp.linalg.norm(g16 - g)) <= 0.05 * float(jnp.linalg.norm(g))


def test_gradient_adds_one_gemm_to_the_value(layer_pair):
  # The envelope gradient is (2/D)(a * rowsum(P) - t P^T): one matrix
  # product more than the value, whatever XLA fuses around it.
  student, teacher = layer_pair(16, 24, 20)

  def gemms(fn):
    text = jax.jit(fn).lower(jnp.asarray(student), teacher).compile(
    ).as_text()
    return text.count(" dot(")

  value = gemms(ot_regularizer)
  assert value >= 1
  assert gemms(jax.value_and_grad(ot_regularizer)) == value + 1


@pytest.mark.parametrize("grad", ["envelope", "unroll"])
@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_vmap_gradient_is_each_members_gradient(layer_pair, grad):
  pairs = [layer_pair(16, 12, 10) for _ in range(3)]
  s = jnp.stack([p[0] for p in pairs])
  t = jnp.stack([p[1] for p in pairs])
  batched = jax.grad(lambda s: jnp.sum(jax.vmap(
      lambda a, b: ot_regularizer(a, b, grad=grad, threshold=1e-6))(s, t)))(s)
  for i in range(3):
    single = jax.grad(ot_regularizer)(s[i], t[i], grad=grad, threshold=1e-6)
    assert float(jnp.linalg.norm(batched[i] - single)) <= 1e-3 * float(
        jnp.linalg.norm(single))


@pytest.mark.parametrize("options", [{}, {"grad": "unroll", "anneal": False,
                                          "epsilon": 0.5}])
@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_float32_activations_under_x64_give_the_float32_result(layer_pair,
                                                               options):
  # ott-jax builds part of its state in float64 under jax_enable_x64, which
  # a float32 solve used to hit as a "cond branches" TypeError; the solve is
  # promoted and the results come back in float32.
  student, teacher = layer_pair(16, 12, 8)
  ref = solve_neuron_ot(student, teacher, **options)
  ref_grad = jax.grad(lambda s: ot_regularizer(s, teacher, **options))(
      jnp.asarray(student))
  with jax.enable_x64(True):
    s32, t32 = jnp.asarray(student, jnp.float32), jnp.asarray(teacher,
                                                              jnp.float32)
    res = solve_neuron_ot(s32, t32, **options)
    grad = jax.grad(lambda s: ot_regularizer(s, t32, **options))(s32)
    warm = solve_neuron_ot(s32, t32, init=res.potentials, **options)
    res64 = solve_neuron_ot(s32.astype(jnp.float64), t32.astype(jnp.float64),
                            **options)
  assert res.value.dtype == res.plan.dtype == res.f.dtype == jnp.float32
  assert grad.dtype == jnp.float32 and bool(res.converged)
  np.testing.assert_allclose(float(res.value), float(ref.value), rtol=1e-4)
  assert np.linalg.norm(grad - ref_grad) <= 1e-3 * np.linalg.norm(ref_grad)
  assert bool(warm.converged) and warm.value.dtype == jnp.float32
  # float64 keeps working, in float64.
  assert res64.value.dtype == jnp.float64 and bool(res64.converged)
  np.testing.assert_allclose(float(res64.value), float(ref.value), rtol=1e-3)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_activations_raise_outside_jit(where, bad):
  s, t = np.ones((4, 3), np.float32), np.ones((4, 5), np.float32)
  (s if where == "student" else t)[1, 2] = bad
  for fn in (ot_regularizer, solve_neuron_ot):
    with pytest.raises(ValueError) as err:
      fn(jnp.asarray(s), t)
    msg = str(err.value)
    assert f"The {where} activations contain 1 non-finite values" in msg
    assert "index (1, 2)" in msg and "converged=False" in msg
  # Under jit nothing can be inspected: NaN, not converged (documented).
  res = jax.jit(solve_neuron_ot)(s, t)
  assert np.isnan(float(res.value)) and not bool(res.converged)


def test_non_finite_init_potentials_raise_outside_jit(layer_pair):
  student, teacher = layer_pair(8, 4, 3)
  f, g = solve_neuron_ot(student, teacher).potentials
  with pytest.raises(ValueError) as err:
    ot_regularizer(student, teacher, init=(f, g.at[1].set(jnp.nan)))
  assert "init potentials g contain 1 non-finite" in str(err.value)
  assert "init=None for a cold start" in str(err.value)
  # Under jit they cannot be inspected; ott-jax's Sinkhorn recovers from
  # them (what the docs say): a converged solve of the same problem.
  cold = solve_neuron_ot(student, teacher)
  res = jax.jit(solve_neuron_ot)(student, teacher,
                                 init=(f.at[0].set(jnp.inf), g))
  assert bool(res.converged)
  assert float(res.value) == pytest.approx(float(cold.value), rel=1e-3)


def test_array_likes_accepted_or_refused_clearly(layer_pair):
  student, teacher = layer_pair(8, 4, 3)
  # Nested lists are arrays like any other.
  assert float(ot_regularizer(student.tolist(), teacher.tolist())) == \
      pytest.approx(float(ot_regularizer(student, teacher)), rel=1e-5)
  assert float(feature_matching(student.tolist(), student)) == 0.0
  for bad in ([[1.0, 2.0], [3.0]], "activations", None):
    with pytest.raises(ValueError, match="student activations, a .* are not "
                       "a numeric array .* Pass a jax or numpy array"):
      ot_regularizer(bad, teacher)
  with pytest.raises(ValueError, match="dtype int64.*x.astype"):
    ot_regularizer([[1, 2], [3, 4]], [[1.0, 2.0], [3.0, 4.0]])


def test_constants_inside_jit_are_checked_without_tracing(layer_pair):
  # A concrete teacher closed over by a jitted loss (the README's pattern) is
  # checked at trace time; a NaN in it is reported there.
  student, teacher = layer_pair(8, 4, 3)
  value = jax.jit(lambda s: ot_regularizer(s, jnp.asarray(teacher)))(student)
  assert np.isfinite(float(value))
  bad = jnp.asarray(teacher).at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="teacher activations contain 1 non"):
    jax.jit(lambda s: ot_regularizer(s, bad))(student)


# ---------------------------------------------------------------------------
# Unbalanced transport (tau < 1)
# ---------------------------------------------------------------------------


def _pot_unbalanced_plan(student, teacher, eps, tau):
  """POT's unbalanced plan (KL(P | u v^T) entropy), float64, and the cost."""
  a = np.asarray(student, np.float64).reshape(-1, student.shape[-1])
  t = np.asarray(teacher, np.float64).reshape(-1, teacher.shape[-1])
  c = ((a[:, :, None] - t[:, None, :]) ** 2).mean(axis=0)
  n_s, n_t = c.shape
  u, v = np.full(n_s, 1 / n_s), np.full(n_t, 1 / n_t)
  rho = eps * tau / (1 - tau)  # ott-jax's tau = rho / (rho + eps)
  plan = pot.unbalanced.sinkhorn_unbalanced(u, v, c, eps, rho,
                                            numItermax=100_000, stopThr=1e-14)
  value = pot.unbalanced.sinkhorn_unbalanced2(
      u, v, c, eps, rho, returnCost="linear", numItermax=100_000,
      stopThr=1e-14)
  return plan, float(value), c


def _unbalanced_objective(student, teacher, eps, tau):
  """min_P <P,C> + eps KL(P|uv^T) + rho KL(P1|u) + rho KL(P^T1|v), by POT."""
  plan, _, c = _pot_unbalanced_plan(student, teacher, eps, tau)
  rho = eps * tau / (1 - tau)
  u, v = np.full(c.shape[0], 1 / c.shape[0]), np.full(c.shape[1],
                                                       1 / c.shape[1])

  def kl(p, q):  # generalised KL, the one both solvers minimise
    return np.sum(p * np.log(p / q) - p + q)

  return (np.sum(plan * c) + eps * kl(plan, np.outer(u, v))
          + rho * kl(plan.sum(1), u) + rho * kl(plan.sum(0), v))


@pytest.mark.parametrize("tau", [0.9, 0.5])
@pytest.mark.parametrize("anderson", [0, 3])
def test_unbalanced_value_and_plan_match_pot(layer_pair, tau, anderson):
  student, teacher = layer_pair(32, 12, 9)
  c = cost_matrix(neuron_descriptors(student), neuron_descriptors(teacher))
  eps = 0.05 * float(jnp.mean(c))
  res = solve_neuron_ot(student, teacher, epsilon=eps, tau=tau,
                        threshold=1e-6, max_iterations=20_000,
                        anderson=anderson)
  plan, value, _ = _pot_unbalanced_plan(student, teacher, eps, tau)
  assert bool(res.converged)
  assert float(res.value) == pytest.approx(value, rel=1e-4)
  np.testing.assert_allclose(np.asarray(res.plan), plan, atol=1e-5)
  # Mass is left unmatched: less than balanced transport's 1.
  assert float(res.mass) == pytest.approx(plan.sum(), rel=1e-4)
  assert float(res.mass) < 0.99


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_unbalanced_envelope_gradient_matches_finite_differences(layer_pair,
                                                                 rng):
  # The gradient is that of the unbalanced entropic objective (Danskin), not
  # of the transport cost <P*, C> it returns as the value.
  student, teacher = layer_pair(16, 10, 8)
  tau = 0.7
  with jax.enable_x64(True):
    s, t = (jnp.asarray(x, jnp.float64) for x in (student, teacher))
    c = cost_matrix(neuron_descriptors(s), neuron_descriptors(t))
    eps = 0.05 * float(jnp.mean(c))
    grad = jax.grad(ot_regularizer)(s, t, epsilon=eps, tau=tau,
                                    threshold=1e-10, max_iterations=20_000)
  s64 = np.asarray(student, np.float64)
  for _ in range(3):
    direction = rng.normal(size=student.shape)
    h = 1e-4
    fd = (_unbalanced_objective(s64 + h * direction, teacher, eps, tau)
          - _unbalanced_objective(s64 - h * direction, teacher, eps, tau)) / (
              2 * h)
    np.testing.assert_allclose(float(np.vdot(np.asarray(grad), direction)),
                               fd, rtol=1e-4)


def test_tau_one_is_balanced_transport(layer_pair):
  student, teacher = layer_pair(16, 12, 9)
  balanced = solve_neuron_ot(student, teacher)
  same = solve_neuron_ot(student, teacher, tau=1.0)
  assert float(same.value) == float(balanced.value)
  np.testing.assert_array_equal(np.asarray(same.plan),
                                np.asarray(balanced.plan))


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_smaller_tau_matches_less_mass_at_lower_cost(layer_pair):
  student, teacher = layer_pair(32, 16, 16)
  results = [solve_neuron_ot(student, teacher, tau=tau)
             for tau in (1.0, 0.9, 0.5)]
  masses = [float(r.mass) for r in results]
  values = [float(r.value) for r in results]
  assert masses[0] == pytest.approx(1.0, abs=2e-3)
  assert masses == sorted(masses, reverse=True) and masses[-1] < 0.9
  assert values == sorted(values, reverse=True)


def test_unbalanced_warm_start_reaches_the_same_plan(layer_pair):
  student, teacher = layer_pair(32, 24, 16)
  cold = solve_neuron_ot(student, teacher, tau=0.8, threshold=1e-5)
  moved = student * 1.01
  ref = solve_neuron_ot(moved, teacher, tau=0.8, threshold=1e-5)
  warm = solve_neuron_ot(moved, teacher, tau=0.8, threshold=1e-5,
                         init=cold.potentials)
  assert bool(warm.converged) and int(warm.n_iters) < int(ref.n_iters)
  assert float(warm.value) == pytest.approx(float(ref.value), rel=1e-3)


def _issue_relu_pair(seed):
  """Independent 64 x 48 and 64 x 32 ReLU features (issue 26's case)."""
  rng = np.random.default_rng(seed)
  return (np.maximum(rng.normal(size=(64, 48)), 0).astype(np.float32),
          np.maximum(rng.normal(size=(64, 32)), 0).astype(np.float32))


@pytest.mark.parametrize("tau", [0.99, 0.999])
@pytest.mark.parametrize("features", ["independent", "correlated"])
def test_tau_near_one_converges_within_the_default_budget(layer_pair, tau,
                                                         features):
  # The values the docs recommend; 0.999 used to stop unconverged at the
  # 2,000 iterations of the old budget (it needed ~4,100).
  student, teacher = (_issue_relu_pair(0) if features == "independent" else
                      layer_pair(64, 48, 32))
  res = solve_neuron_ot(student, teacher, tau=tau)
  assert bool(res.converged)
  assert int(res.n_iters) <= ot_module.iteration_budget(2000, tau)
  if features == "independent":
    # Recentred potentials: the slow mass mode is gone, not just outwaited.
    assert int(res.n_iters) <= 100
  c = cost_matrix(neuron_descriptors(student), neuron_descriptors(teacher))
  _, value, _ = _pot_unbalanced_plan(student, teacher,
                                     float(res.epsilon), tau)
  assert float(jnp.mean(c)) * 0.01 == pytest.approx(float(res.epsilon),
                                                    rel=1e-5)
  assert float(res.value) == pytest.approx(value, rel=1e-3)


def test_iteration_budget_grows_with_rho_over_eps():
  budget = ot_module.iteration_budget
  assert budget(2000, 1.0) == 2000 and budget(7, 1.0) == 7
  assert budget(2000, 0.999) == 2000 + 4995  # 5 rho / eps, rho / eps = 999
  assert budget(2000, 0.9) == 2045
  assert budget(1, 0.5) == 6


def test_non_convergence_is_reported_not_hidden(layer_pair):
  # A budget too small for the threshold: a value comes back, and so does
  # converged=False.
  student, teacher = layer_pair(64, 48, 32)
  value, res = ot_regularizer(student, teacher, max_iterations=3,
                              anneal=False, inner_iterations=1,
                              return_transport=True)
  assert not bool(res.converged) and int(res.n_iters) == 3
  assert np.isfinite(float(value)) and float(value) == float(res.value)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5, float("nan"), "0.5", None])
def test_invalid_tau_rejected(tau):
  with pytest.raises(ValueError, match="tau"):
    ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 5)), tau=tau)


def test_traced_tau_rejected_with_the_fix():
  with pytest.raises(ValueError, match="concrete Python float"):
    jax.jit(lambda tau: ot_regularizer(jnp.ones((4, 3)), jnp.ones((4, 5)),
                                       tau=tau))(0.5)
