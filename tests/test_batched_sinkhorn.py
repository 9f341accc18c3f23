"""The batched Sinkhorn solve of an Omega_P term: one loop, the per-layer
solve's results.

The per-layer solve (ott-jax's ``Sinkhorn`` through ``solve_neuron_ot``) is
the reference. Values and gradients are compared at ``threshold=1e-4``: at
the default 1e-3 two correct solves of the same problem may differ by up to
~0.5 % in value and ~1 % in gradient (where each stops within the threshold),
which says nothing about either.
"""

import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import sinkhorn_replay
from ot_transfer_jax import (batched_sinkhorn, ot, optim, parallel,
                             regularizers, train)
from ot_transfer_jax.models import create_model

HERE = pathlib.Path(__file__).resolve().parent
WIDTHS = ((8, 12), (16, 16), (32, 24))  # (n_s, n_t) of the 3 layer pairs.
CLOSE = {"threshold": 1e-4}
TOLERANCE = 5e-3  # relative: 0.5 %


@pytest.fixture
def pairs(layer_pair):
  """3 layer pairs of ReLU activations of unequal widths, batch 64."""
  made = [layer_pair(64, n_s, n_t) for n_s, n_t in WIDTHS]
  return [s for s, _ in made], [t for _, t in made]


def per_layer(students, teachers, inits=None, **options):
  """``[(value, gradient in the student)]`` of ``solve_neuron_ot`` per pair."""
  inits = inits or [None] * len(students)

  def value(s, t, init):
    return ot.solve_neuron_ot(s, t, init=init, **options).value

  return [jax.jit(jax.value_and_grad(value))(s, t, i)
          for s, t, i in zip(students, teachers, inits)]


def batched(students, teachers, inits=None, **options):
  """``(results, gradients)``: ``solve_layers`` and the gradient of the sum
  of its values in each student."""

  def total(students):
    out = batched_sinkhorn.solve_layers(students, teachers, inits=inits,
                                        **options)
    return sum(r.value for r in out), out

  grads, out = jax.jit(jax.grad(total, has_aux=True))(students)
  return out, grads


def relative(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def assert_matches_per_layer(students, teachers, inits=None, **options):
  out, grads = batched(students, teachers, inits, **options)
  refs = per_layer(students, teachers, inits, **options)
  for res, grad, (ref_value, ref_grad) in zip(out, grads, refs):
    assert bool(res.converged)
    assert relative(res.value, ref_value) < TOLERANCE
    assert relative(grad, ref_grad) < TOLERANCE
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  return out


# ---------------------------------------------------------------------------
# Structure: one loop, no conditional, in a compiled training step
# ---------------------------------------------------------------------------


def _count(pattern, hlo):
  return len(re.findall(pattern, hlo))


def _train_step_hlo(solver):
  """The compiled HLO of a digits CNN training step with Omega_P on its 3
  stages (student and teacher at random initialisation, batch 8)."""
  model = create_model("digits_cnn", 5, width=0.5)
  teacher = create_model("digits_cnn", 5)
  sample = jnp.zeros((8, 8, 8, 1))
  teacher_vars = train.init_model(teacher, jax.random.PRNGKey(1), sample[:1])
  terms = (regularizers.make_term(
      "ot", "ot", weight=0.1, student_layers=("stage1", "stage2", "stage3"),
      solver=solver),)
  tx = optim.make_optimizer(10, learning_rate=0.05)
  state = train.create_train_state(model, teacher, teacher_vars, terms,
                                   jax.random.PRNGKey(0), sample, tx)
  mesh = parallel.make_mesh()
  step = train.make_train_step(
      train.make_loss_fn(model, teacher, terms), tx, mesh)
  batch = parallel.shard_batch(
      {"image": np.random.default_rng(0).normal(
          size=(8, 8, 8, 1)).astype(np.float32),
       "label": np.arange(8) % 5}, mesh)
  compiled = step.lower(state, teacher_vars, batch).compile()
  return compiled.as_text(), compiled(state, teacher_vars, batch)[1]


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_a_training_step_solves_its_three_layers_in_one_loop_without_conditionals():
  hlo, metrics = _train_step_hlo("batched")
  assert _count(r"\bwhile\(", hlo) == 1
  assert _count(r"\bconditional\(", hlo) == 0
  # The per-layer metrics are still there: each layer's own iterations, a
  # multiple of the block, and its convergence.
  for layer in ("stage1", "stage2", "stage3"):
    key = f"ot/{layer}->{layer}"
    iters = int(metrics[f"sinkhorn_iters/{key}"])
    assert iters > 0 and iters % batched_sinkhorn.DEFAULT_BLOCK == 0
    assert float(metrics[f"sinkhorn_converged/{key}"]) == 1.0
    assert np.isfinite(float(metrics[f"reg/{key}"]))


def test_the_hlo_counters_see_the_per_layer_solves_loops_and_conditionals(
    layer_pair):
  # The counters above are not blind: one per-layer solve (ott-jax's
  # Sinkhorn) compiles to nested loops and a conditional per iteration.
  student, teacher = layer_pair(16, 8, 8)
  hlo = jax.jit(jax.grad(lambda s: ot.solve_neuron_ot(
      s, teacher).value)).lower(student).compile().as_text()
  assert _count(r"\bwhile\(", hlo) >= 2
  assert _count(r"\bconditional\(", hlo) >= 1


# ---------------------------------------------------------------------------
# The per-layer solve's results
# ---------------------------------------------------------------------------


def test_cold_values_and_gradients_match_the_per_layer_solve(pairs):
  out = assert_matches_per_layer(*pairs, **CLOSE)
  for res, (n_s, n_t) in zip(out, WIDTHS):
    # The padding carries no mass and leaves no -inf behind.
    assert res.plan.shape == (n_s, n_t) and res.f.shape == (n_s,)
    assert np.all(np.isfinite(res.f)) and np.all(np.isfinite(res.g))
    np.testing.assert_allclose(float(res.mass), 1.0, atol=1e-3)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_warm_values_and_gradients_match_the_per_layer_solve(pairs):
  students, teachers = pairs
  cold = [ot.solve_neuron_ot(s, t, **CLOSE) for s, t in zip(*pairs)]
  moved = [s * 1.02 + 0.01 for s in students]
  out = assert_matches_per_layer(moved, teachers,
                                 [r.potentials for r in cold], **CLOSE)
  # A warm start needs fewer iterations than a cold one.
  cold_iters = [int(r.n_iters) for r in batched(moved, teachers,
                                                **CLOSE)[0]]
  assert sum(int(r.n_iters) for r in out) < sum(cold_iters)


@pytest.mark.parametrize("tau", [0.9])
@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_unbalanced_values_and_gradients_match_the_per_layer_solve(pairs, tau):
  students, teachers = pairs
  out = assert_matches_per_layer(students, teachers, tau=tau, **CLOSE)
  for res, (s, t) in zip(out, zip(*pairs)):
    ref = ot.solve_neuron_ot(s, t, tau=tau, **CLOSE)
    # Part of the mass stays unmatched, as in the per-layer solve.
    assert float(res.mass) < 0.999
    np.testing.assert_allclose(float(res.mass), float(ref.mass), rtol=5e-3)
  inits = [r.potentials for r in out]
  assert_matches_per_layer([s * 1.02 for s in students], teachers, inits,
                           tau=tau, **CLOSE)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_each_problem_gives_what_its_own_solve_gives(pairs):
  # Converged problems stop changing: solving the 3 pairs together gives
  # each pair's result alone (up to float32 round-off), iterations included.
  together = batched_sinkhorn.solve_layers(*pairs)
  for i, res in enumerate(together):
    [alone] = batched_sinkhorn.solve_layers([pairs[0][i]], [pairs[1][i]])
    assert int(res.n_iters) == int(alone.n_iters)
    np.testing.assert_allclose(res.value, alone.value, rtol=1e-5)
    np.testing.assert_allclose(res.plan, alone.plan, rtol=1e-4, atol=1e-7)
  assert len({int(r.n_iters) for r in together}) > 1  # Not all alike.


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_a_non_finite_layer_is_nan_and_unconverged_alone(pairs):
  # Under jit nothing can be checked: the layer with a NaN activation gives
  # a NaN value with converged=False; the other problems are not touched.
  students, teachers = pairs
  bad = [students[0], jnp.asarray(students[1]).at[0, 0].set(jnp.nan),
         students[2]]
  out = jax.jit(batched_sinkhorn.solve_layers)(bad, teachers)
  assert [bool(r.converged) for r in out] == [True, False, True]
  assert np.isnan(float(out[1].value))
  good = batched_sinkhorn.solve_layers(students, teachers)
  for i in (0, 2):
    np.testing.assert_allclose(out[i].value, good[i].value, rtol=1e-5)


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_bfloat16_activations(pairs):
  students, teachers = pairs
  low = [jnp.asarray(s, jnp.bfloat16) for s in students]
  out, grads = batched(low, teachers, **CLOSE)
  for res, grad, (ref_value, _) in zip(out, grads,
                                       per_layer(low, teachers, **CLOSE)):
    assert res.value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    assert relative(res.value, ref_value) < TOLERANCE
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.slow  # 4-9 s of compilation: full suite only.
def test_float32_activations_under_x64(pairs):
  with jax.enable_x64(True):
    out = assert_matches_per_layer(*pairs, **CLOSE)
    assert all(r.value.dtype == jnp.float32 and r.f.dtype == jnp.float32
               for r in out)


@pytest.mark.slow  # A subprocess on 2 simulated devices: ~20 s.
def test_global_batch_under_shard_map_on_two_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      [sys.executable, str(HERE / "batched_sinkhorn_check.py")],
      capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith("{")]
  assert rows[-1] == {"done": True}
  assert [r["case"] for r in rows[:-1]] == ["shard_map/cold",
                                            "shard_map/warm"]
  for row in rows[:-1]:
    assert row["converged"], row
    assert row["value_rel"] < 1e-5 and row["grad_rel"] < 1e-5, row


# ---------------------------------------------------------------------------
# A real run's problems
# ---------------------------------------------------------------------------


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_replay_of_a_digits_run_matches_todays_solver():
  # The cost matrices of the first 40 steps of the digits transfer Omega_P
  # run (the hardest: the plans move most), warm-started step to step.
  data = sinkhorn_replay.load()
  assert data["units"].shape == (40, 3)
  reference = sinkhorn_replay.replay(data, "per_layer")
  result = sinkhorn_replay.replay(data, "batched")
  assert reference.converged.all() and result.converged.all()
  assert np.max(np.abs(result.values / reference.values - 1)) < TOLERANCE
  # One loop runs as long as its slowest layer: fewer loop iterations per
  # step than the per-layer loops together (without Anderson: more in all).
  loop = result.iters.max(axis=1)
  assert loop.mean() < reference.iters.sum(axis=1).mean()


# ---------------------------------------------------------------------------
# Options and errors
# ---------------------------------------------------------------------------


def test_options_are_the_same_dataclasses_as_solve_neuron_ot(pairs):
  # One definition of the options and their defaults for both solvers.
  ours = inspect.signature(batched_sinkhorn.solve_layers).parameters
  theirs = inspect.signature(ot.solve_neuron_ot).parameters
  for name in ("problem", "sinkhorn"):
    assert ours[name].default is theirs[name].default is None
  students, teachers = pairs
  by_keyword = batched_sinkhorn.solve_layers(
      students, teachers, relative_epsilon=0.02, tau=0.9, threshold=1e-4)
  by_dataclass = batched_sinkhorn.solve_layers(
      students, teachers,
      problem=ot.NeuronProblem(relative_epsilon=0.02, tau=0.9),
      sinkhorn=ot.SinkhornOptions(threshold=1e-4))
  for a, b in zip(by_keyword, by_dataclass):
    assert float(a.value) == float(b.value)
  with pytest.raises(TypeError, match="options the batched solver does not "
                     "have"):
    batched_sinkhorn.solve_layers(students, teachers, anderson=0)


def test_auto_is_batched_on_accelerators_and_per_layer_on_the_cpu():
  resolve = batched_sinkhorn.resolve_solver
  assert resolve("auto", "cpu") == "per_layer"
  assert resolve("auto", "gpu") == resolve("auto", "tpu") == "batched"
  assert resolve("per_layer", "gpu") == "per_layer"
  assert resolve("batched", "cpu") == "batched"


def test_bad_options_say_what_to_do(pairs):
  students, teachers = pairs
  with pytest.raises(ValueError, match="solver='per_layer'"):
    batched_sinkhorn.solve_layers(students, teachers, grad="unroll")
  with pytest.raises(ValueError, match="one teacher per student"):
    batched_sinkhorn.solve_layers(students, teachers[:2])
  with pytest.raises(ValueError, match="inits holds 1 pairs"):
    batched_sinkhorn.solve_layers(students, teachers, inits=[(0, 0)])
  with pytest.raises(ValueError, match="Layer pair 1: init potentials"):
    batched_sinkhorn.solve_layers(
        students, teachers,
        inits=[(jnp.zeros(n_s), jnp.zeros(n_t + (i == 1)))
               for i, (n_s, n_t) in enumerate(WIDTHS)])
  with pytest.raises(ValueError, match="block must be an integer >= 1"):
    batched_sinkhorn.solve_layers(students, teachers, block=0)
  with pytest.raises(ValueError, match="solver='nope' is not one of"):
    regularizers.OmegaP(solver="nope")
  with pytest.raises(ValueError, match="use solver='per_layer'"):
    regularizers.OmegaP(solver="batched", grad="unroll")


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_tau_close_to_one_converges_with_the_default_budget_as_per_layer():
  # The per-layer path's recentring and budget (ot.iteration_budget) hold
  # in the one loop too, padding included (48 vs 16 student neurons).
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  students = [jax.nn.relu(jax.random.normal(ks[0], (64, 48))),
              jax.nn.relu(jax.random.normal(ks[1], (64, 16)))]
  teachers = [jax.nn.relu(jax.random.normal(ks[2], (64, 32))),
              jax.nn.relu(jax.random.normal(ks[3], (64, 24)))]
  results = batched_sinkhorn.solve_layers(students, teachers, tau=0.999)
  for s, t, r in zip(students, teachers, results):
    ref = ot.solve_neuron_ot(s, t, tau=0.999)
    assert bool(r.converged) and int(r.n_iters) < 2000
    np.testing.assert_allclose(r.value, ref.value, rtol=1e-3)
    np.testing.assert_allclose(r.mass, ref.mass, rtol=1e-3)
