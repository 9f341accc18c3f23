"""Global-batch losses on 2 simulated CPU devices against 1 device.

Run as a script (``tests/test_multidevice.py`` does, in a subprocess): the
device count must be set before JAX initialises. Prints one JSON line per
case: ``{"case": ..., "value_rel": ..., "grad_rel": ...}`` (relative errors of
the value and of the concatenated per-shard gradients against the
single-device computation on the global batch), then ``{"done": true}``.

The OT cases use ``relative_epsilon=0.05`` and ``threshold=1e-5``: at the
default 0.01, float32 round-off alone (a different summation order, even jit
vs eager on one device) moves a cold solve's value by up to ~1e-5, the
tolerance checked here; and where the default stopping rule (marginal error
1e-3) fires depends on round-off too (with Anderson acceleration it moved the
gradient by up to 1e-4), so the solves are compared near their fixed point.
"""

from two_devices import AXIS, MESH, emit  # first: sets the device count

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ot_transfer_jax import losses, ot

RNG = np.random.default_rng(0)
OT_OPTIONS = {"relative_epsilon": 0.05, "threshold": 1e-5}


def activations(positions, n_s, n_t, batch=8):
  """Correlated ReLU activations (batch, *positions, n), float32."""
  z = RNG.normal(size=(batch, *positions, 5))
  w_t = RNG.normal(size=(5, n_t))
  w_s = w_t[:, RNG.integers(0, n_t, n_s)]
  t = np.maximum(z @ w_t, 0)
  s = np.maximum(z @ w_s + 0.5 * RNG.normal(size=(batch, *positions, n_s)), 0)
  return jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)


def relative(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def compare(case, loss, student, teacher, *extra, check_vma_off=False):
  """``loss(student, teacher, *extra, axis_name)`` -> scalar; prints errors.

  ``extra`` arguments are replicated (e.g. warm-start potentials).
  """
  ref_v, ref_g = jax.jit(jax.value_and_grad(
      lambda s: loss(s, teacher, *extra, None)))(student)

  def sharded(s, t, *extra):
    return jax.value_and_grad(lambda s: loss(s, t, *extra, AXIS))(s)

  def split(x):
    return x.reshape(2, x.shape[0] // 2, *x.shape[1:])

  rep = (None,) * len(extra)
  pv, pg = jax.pmap(sharded, axis_name=AXIS, in_axes=(0, 0, *rep))(
      split(student), split(teacher), *extra)
  sv, sg = jax.jit(jax.shard_map(
      sharded, mesh=MESH, in_specs=(P(AXIS), P(AXIS), *(P(),) * len(extra)),
      out_specs=(P(), P(AXIS))))(student, teacher, *extra)
  # pmap counts every device's copy of the replicated value: the gradient is
  # the device count (2) times the per-shard part (see ot.py's docstring).
  results = [("pmap", pv[0], pg.reshape(student.shape) / 2),
             ("shard_map", sv, sg)]
  if check_vma_off:  # Untyped shard_map: pmap's rule.
    v, g = jax.jit(jax.shard_map(
        sharded, mesh=MESH, in_specs=(P(AXIS), P(AXIS), *(P(),) * len(extra)),
        out_specs=(P(), P(AXIS)), check_vma=False))(student, teacher, *extra)
    results.append(("shard_map_no_vma", v, g / 2))
  for how, v, g in results:
    emit({"case": f"{case}/{how}",
                      "value_rel": relative(v, ref_v),
                      "grad_rel": relative(g, ref_g),
                      # pmap: every device must hold the same value.
                      "replicated": bool(pv[0] == pv[1])})


def ot_cases(grid):
  """``grid``: ``layout/widths/normalize`` names (``test_multidevice.OT_GRID``)."""
  layouts = {"dense": (), "conv": (2, 2)}
  widths = {"equal": (6, 6), "unequal": (6, 4)}
  for layout, w, normalize in (name.split("/") for name in grid):
    n_s, n_t = widths[w]
    student, teacher = activations(layouts[layout], n_s, n_t)
    options = {"normalize": normalize, **OT_OPTIONS}
    cold = ot.solve_neuron_ot(student, teacher, **options)
    init = cold.potentials
    moved = student * 1.01 + 0.01

    def loss(s, t, *rest, options=options):
      *init, axis_name = rest  # init: () cold, (f, g) warm
      return ot.solve_neuron_ot(s, t, axis_name=axis_name,
                                init=tuple(init) or None, **options).value

    name = f"ot/{layout}/{w}/{normalize}"
    compare(f"{name}/cold", loss, student, teacher,
            check_vma_off=normalize == "standardize")
    compare(f"{name}/warm", loss, moved, teacher, *init)


def unbalanced_cases():
  """Unbalanced transport (tau < 1): the same global-batch rules, on a conv
  layer of unequal widths (each layout is checked by the balanced cases)."""
  student, teacher = activations((2, 2), 6, 4)
  options = {"tau": 0.8, **OT_OPTIONS}
  init = ot.solve_neuron_ot(student, teacher, **options).potentials

  def loss(s, t, *rest):
    *init, axis_name = rest  # init: () cold, (f, g) warm
    return ot.solve_neuron_ot(s, t, axis_name=axis_name,
                              init=tuple(init) or None, **options).value

  compare("ot/conv/unequal/tau0.8/cold", loss, student, teacher)
  compare("ot/conv/unequal/tau0.8/warm", loss, student * 1.01 + 0.01,
          teacher, *init)


def baseline_cases():
  s, t = activations((2, 2), 6, 6)
  weights = jnp.asarray(RNG.dirichlet(np.ones(6)), jnp.float32)
  for normalize in ot.NORMALIZE_MODES:
    compare(f"feature_matching/{normalize}",
            lambda s, t, a, n=normalize: losses.feature_matching(
                s, t, normalize=n, axis_name=a), s, t)
    compare(f"delta/{normalize}",
            lambda s, t, a, n=normalize: losses.delta(
                s, t, weights, normalize=n, axis_name=a), s, t)
  compare("attention_transfer", lambda s, t, a: losses.attention_transfer(
      s, t, axis_name=a), s, t)
  compare("fitnets_hint", lambda s, t, a: losses.fitnets_hint(
      s, t, axis_name=a), s, t)


def upstream_varying_cost():
  """Does ott-jax's Sinkhorn accept a cost that varies across the mesh?"""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  def solve(c):
    geom = geometry.Geometry(cost_matrix=c[0])
    return sinkhorn.Sinkhorn()(linear_problem.LinearProblem(geom)).reg_ot_cost

  c = jnp.asarray(RNG.random((2, 4, 3)), jnp.float32)
  try:
    jax.jit(jax.shard_map(solve, mesh=MESH, in_specs=P(AXIS),
                          out_specs=P(AXIS)))(c)
    fixed = True
  except TypeError:
    fixed = False
  emit({"upstream_varying_cost_works": fixed})


def varying_init_case():
  """Warm-start potentials that differ per device are made replicated."""
  student, teacher = activations((), 6, 4)
  f, g = ot.solve_neuron_ot(student, teacher, **OT_OPTIONS).potentials

  def value(s, t):
    noise = 0.0 * jnp.sum(s)  # varies across the mesh, numerically 0
    return ot.solve_neuron_ot(s, t, init=(f + noise, g + noise),
                              axis_name=AXIS, **OT_OPTIONS).value

  v = jax.jit(jax.shard_map(value, mesh=MESH, in_specs=(P(AXIS), P(AXIS)),
                            out_specs=P()))(student, teacher)
  ref = jax.jit(lambda s, t: ot.solve_neuron_ot(
      s, t, init=(f, g), **OT_OPTIONS).value)(student, teacher)
  emit({"case": "ot/varying_init/shard_map",
                    "value_rel": relative(v, ref), "grad_rel": 0.0,
                    "replicated": True})


def readme_case():
  """The docs' pmap / shard_map example (docs/usage.md), on 2 devices."""
  from doc_support import run_block  # this script's directory: tests/
  ns = run_block("### Several devices")
  flat = lambda tree: np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(tree)])
  for how in ("pmap", "shard"):
    emit({"case": f"readme/{how}",
                      "value_rel": relative(ns[f"loss_{how}"], ns["loss_ref"]),
                      "grad_rel": relative(flat(ns[f"grads_{how}"]),
                                           flat(ns["grads_ref"])),
                      "replicated": True})


if __name__ == "__main__":
  assert len(jax.devices()) >= 2, jax.devices()
  ot_cases(sys.argv[1].split(","))
  unbalanced_cases()
  baseline_cases()
  varying_init_case()
  readme_case()
  upstream_varying_cost()
  emit({"done": True})
