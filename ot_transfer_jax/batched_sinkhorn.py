"""One Sinkhorn loop for all the layer pairs of an Omega_P term.

:func:`ot_transfer_jax.ot.solve_neuron_ot` solves one layer pair with ott-jax's
``Sinkhorn``: three nested loops once compiled (its outer ``while``, the inner
iterations, Anderson's linear solve) and a ``cond`` per iteration, one solve
after another for the L layers of a term. On a GPU or TPU every loop trip and
``cond`` waits on the host before the next kernels launch, and the iterations'
arithmetic (64-2048 neurons) is negligible next to those waits: the price is
the number of trips. :func:`solve_layers` solves the L problems together:

* **Padding.** Problem ``l`` (``n_s[l] x n_t[l]`` neurons) is padded to the
  common ``(N, M) = (max n_s, max n_t)`` with zero-mass neurons: marginal 0,
  log-marginal ``-inf``, so their potentials are ``-inf`` after the first
  update and they carry no mass (ott-jax's own convention for zero weights:
  its updates and momentum mask non-finite potentials, so no NaN appears).
  Each problem keeps its own epsilon, warm start and convergence.
* **One loop.** A single ``lax.while_loop`` whose body runs ``block``
  log-domain Sinkhorn iterations, unrolled, on the ``(L, N, M)`` stack (ott-
  jax's ``Geometry.update_potential``, ``vmap``-ed over the problems; the
  unbalanced update is ott-jax's ``tau`` times it), then computes each
  problem's marginal error once (ott-jax's ``solution_error``: the L1 error of
  the column marginal for balanced problems, the gradient of the marginal
  fit for ``tau < 1``). A problem whose error is below ``threshold`` (or not
  finite: diverged) stops: its later updates are masked, so its result is
  the one its own solve would give. The loop ends when every problem has
  stopped or after ``ceil(max_iterations / block)`` blocks. No nested loop,
  no ``cond``, no Anderson acceleration (its linear solve is a loop).
* **Iterations.** Problem ``l`` reports ``n_iters = block x`` the blocks it
  ran; the loop itself ran the largest of these.

Everything around the loop is :func:`~ot_transfer_jax.ot.solve_neuron_ot`'s,
layer by layer: the descriptors, the cost matrix in units of its mean, the
relative epsilon, the cost shift ``eps log(n_s n_t)`` of unbalanced problems,
the plan, value and envelope gradient (a ``custom_vjp``), the ``psum`` of the
partial cost terms under ``axis_name`` and the warm-start potentials ``(f,
g)`` per layer. A cold start (``inits=None``) uses the same epsilon scaling
(``anneal``: from ``ANNEAL_INIT`` times epsilon, at least
``ANNEAL_ITERATIONS`` iterations). ``grad="unroll"`` is not offered here (a
``while_loop`` cannot be differentiated in reverse): use the per-layer path.

Precision as the per-layer path: float32 activations are solved in float32
(in float64 under ``jax_enable_x64``, results back in float32), bfloat16
promoted to float32, float64 stays float64.

Which path a training step uses is the Omega_P option ``solver``
(:func:`resolve_solver`): ``"auto"`` is this one on GPUs and TPUs and the
per-layer solve on the CPU, where both cost about the same and the per-layer
path's Anderson acceleration needs fewer iterations.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ot_transfer_jax import ot

SOLVERS = ("auto", "batched", "per_layer")
#: Sinkhorn iterations per loop trip (one convergence check per block).
DEFAULT_BLOCK = 8


def resolve_solver(solver: str, backend: Optional[str] = None) -> str:
  """``"batched"`` or ``"per_layer"``: what ``solver`` means on ``backend``.

  ``"auto"`` is ``"batched"`` on accelerators (``backend`` ``"gpu"``,
  ``"tpu"``, ...; default ``jax.default_backend()``), where each loop trip
  costs a wait on the host, and ``"per_layer"`` on the CPU.
  """
  ot._check_choice("solver", solver, SOLVERS)
  if solver != "auto":
    return solver
  backend = backend or jax.default_backend()
  return "per_layer" if backend == "cpu" else "batched"


def check_block(block: Any) -> int:
  """``block`` as an int; ValueError unless an integer >= 1."""
  return ot._check_count("block", block)


@struct.dataclass
class BatchedSinkhorn:
  """The stacked solution of L padded OT problems (a pytree).

  Attributes:
    f: ``(L, N)`` potentials of the rows (``-inf`` on padded rows).
    g: ``(L, M)`` potentials of the columns (``-inf`` on padded columns).
    converged: ``(L,)`` bool, error below the threshold at the last check.
    n_iters: ``(L,)`` int32, iterations each problem ran (blocks x block).
    errors: ``(L,)`` the marginal error at each problem's last check.
  """

  f: jax.Array
  g: jax.Array
  converged: jax.Array
  n_iters: jax.Array
  errors: jax.Array


def pad_stack(matrices: Sequence[jax.Array], value: float = 0.0) -> jax.Array:
  """``(L, N, M)``: the ``(n_l, m_l)`` matrices padded at the end with
  ``value`` to the largest ``N`` and ``M``."""
  n = max(m.shape[0] for m in matrices)
  k = max(m.shape[1] for m in matrices)
  return jnp.stack([jnp.pad(m, ((0, n - m.shape[0]), (0, k - m.shape[1])),
                            constant_values=value) for m in matrices])


def pad_vectors(vectors: Sequence[jax.Array], size: int) -> jax.Array:
  """``(L, size)``: the vectors padded at the end with zeros."""
  return jnp.stack([jnp.pad(v, (0, size - v.shape[0])) for v in vectors])


def sinkhorn(
    cost: jax.Array,
    epsilon: jax.Array,
    shapes: Sequence[Tuple[int, int]],
    *,
    init: Optional[Tuple[jax.Array, jax.Array]] = None,
    tau: float = 1.0,
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    block: int = DEFAULT_BLOCK,
    anneal: bool = False,
) -> BatchedSinkhorn:
  """Log-domain Sinkhorn on L padded problems at once, in one loop.

  Each problem has uniform marginals over its own ``shapes[l] = (n_s, n_t)``
  leading rows and columns; the rest of the ``(N, M)`` block is padding
  (its cost is ignored).

  Args:
    cost: ``(L, N, M)`` cost matrices (padded).
    epsilon: ``(L,)`` each problem's entropic regularisation.
    shapes: the L problems' ``(n_s, n_t)`` (static).
    init: ``(f (L, N), g (L, M))`` warm-start potentials (padding ignored),
      or None: zeros.
    tau: in (0, 1]; ott-jax's ``tau_a = tau_b = tau`` (1: balanced).
    threshold: a problem stops when its marginal error is below this.
    max_iterations: budget; the loop runs at most ``ceil(max_iterations /
      block)`` blocks.
    block: iterations per loop trip, between two convergence checks.
    anneal: epsilon scaling (a cold start): ``epsilon`` times
      ``max(ANNEAL_INIT * ANNEAL_DECAY^it, 1)``, no problem stopping before
      ``ANNEAL_ITERATIONS`` iterations.

  Returns:
    A :class:`BatchedSinkhorn`.
  """
  from ott.geometry import epsilon_scheduler, geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn as ott_sinkhorn

  num, n, m = cost.shape
  if len(shapes) != num:
    raise ValueError(f"{len(shapes)} shapes for {num} cost matrices.")
  dtype = cost.dtype
  rows = np.arange(n)[None, :] < np.array([s[0] for s in shapes])[:, None]
  cols = np.arange(m)[None, :] < np.array([s[1] for s in shapes])[:, None]
  # Zero-mass padding: log(0) = -inf, ott-jax's convention for zero weights.
  a = jnp.asarray(rows / rows.sum(1, keepdims=True), dtype)
  b = jnp.asarray(cols / cols.sum(1, keepdims=True), dtype)
  epsilon = jnp.asarray(epsilon, dtype)
  min_iterations = ot.ANNEAL_ITERATIONS if anneal else 0
  n_blocks = max(-(-max_iterations // block), 1)

  def problem(c, eps, a, b):
    schedule = (epsilon_scheduler.Epsilon(eps, ot.ANNEAL_INIT,
                                          ot.ANNEAL_DECAY) if anneal else eps)
    geom = geometry.Geometry(cost_matrix=c, epsilon=schedule)
    return linear_problem.LinearProblem(geom, a, b, tau_a=tau, tau_b=tau)

  # ott-jax's own log-domain step (g, then f from it; no momentum) and, for
  # tau < 1, its recentring of the potentials, as the per-layer path runs it.
  recenter = tau < 1.0
  step = ott_sinkhorn.Sinkhorn(lse_mode=True, recenter_potentials=recenter)

  def update(c, eps, a, b, f, g, iteration):
    state = ott_sinkhorn.SinkhornState(potentials=(f, g))
    return step.lse_step(problem(c, eps, a, b), state, iteration).potentials

  def error(c, eps, a, b, f, g):
    # Balanced: the last update (of f) makes the row marginal exact, so the
    # column marginal's L1 error; unbalanced: the marginal fit's gradient.
    state = ott_sinkhorn.SinkhornState(potentials=(f, g))
    return state.solution_error(problem(c, eps, a, b), norm_error=(1,),
                                lse_mode=True, parallel_dual_updates=False,
                                recenter=recenter)[0]

  update = jax.vmap(update, in_axes=(0, 0, 0, 0, 0, 0, None))
  error = jax.vmap(error)

  if init is None:
    f0, g0 = jnp.zeros((num, n), dtype), jnp.zeros((num, m), dtype)
  else:
    f0, g0 = (jnp.asarray(p, dtype) for p in init)
  # Padding carries no mass from the start (and a non-finite init there is
  # ignored).
  f0 = jnp.where(rows, f0, -jnp.inf)
  g0 = jnp.where(cols, g0, -jnp.inf)

  def body(state):
    trips, f, g, active, converged, n_iters, errors = state
    keep = active[:, None]
    for i in range(block):  # Unrolled: no loop, no cond inside the trip.
      f_new, g_new = update(cost, epsilon, a, b, f, g, trips * block + i)
      f, g = jnp.where(keep, f_new, f), jnp.where(keep, g_new, g)
    err = error(cost, epsilon, a, b, f, g)
    checked = (trips + 1) * block >= min_iterations + 1
    stop = active & checked & ((err < threshold) | ~jnp.isfinite(err))
    return (trips + 1, f, g, active & ~stop,
            converged | (stop & (err < threshold)),
            n_iters + block * active.astype(jnp.int32),
            jnp.where(active, err, errors))

  def cond(state):
    trips, active = state[0], state[3]
    return (trips < n_blocks) & jnp.any(active)

  state = (jnp.zeros((), jnp.int32), f0, g0, jnp.ones((num,), bool),
           jnp.zeros((num,), bool), jnp.zeros((num,), jnp.int32),
           jnp.full((num,), jnp.inf, dtype))
  _, f, g, _, converged, n_iters, errors = jax.lax.while_loop(cond, body,
                                                              state)
  return BatchedSinkhorn(f=f, g=g, converged=converged, n_iters=n_iters,
                         errors=errors)


class _Layer(NamedTuple):
  """One pair's side of the solve, as ``solve_neuron_ot`` computes it."""

  a: jax.Array  # (D, n_s) student descriptors.
  t: jax.Array  # (D, n_t) teacher descriptors (constant).
  scaled: jax.Array  # (n_s, n_t) cost in units of its mean (constant).
  unit: jax.Array  # Scalar, that mean.
  eps: jax.Array  # Scalar, the absolute epsilon.
  d: int  # Descriptor length (global batch).
  init: Optional[Tuple[jax.Array, jax.Array]]  # Absolute (f, g), or None.


def solve_layers(
    students: Sequence[jax.Array],
    teachers: Sequence[jax.Array],
    *,
    epsilon: Optional[float] = None,
    relative_epsilon: float = ot.DEFAULT_RELATIVE_EPSILON,
    spatial: ot.Spatial = "flatten",
    normalize: ot.Normalize = "none",
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    anneal: bool = True,
    grad: ot.GradMode = "envelope",
    inits: Optional[Sequence[Tuple[jax.Array, jax.Array]]] = None,
    axis_name: ot.AxisName = None,
    precision: ot.Precision = "highest",
    tau: float = 1.0,
    block: int = DEFAULT_BLOCK,
) -> Tuple[ot.NeuronTransport, ...]:
  """Omega_P of L layer pairs, their OT problems solved in one loop.

  Args:
    students: L arrays ``(m, *positions, n_s[l])``.
    teachers: L arrays ``(m, *positions', n_t[l])`` of the same batch
      (constants).
    inits: None (cold start, for every pair) or L pairs ``(f (n_s[l],), g
      (n_t[l],))`` of a previous solve (warm start).
    block: Sinkhorn iterations per loop trip (one convergence check each).
    epsilon: as in :func:`ot_transfer_jax.ot.solve_neuron_ot`, shared by
      the L pairs (None: each pair's own ``relative_epsilon x`` mean cost);
      so are ``relative_epsilon``, ``spatial``, ``normalize``,
      ``threshold``, ``max_iterations``, ``anneal``, ``axis_name``,
      ``precision`` and ``tau``.
    grad: ``"envelope"`` only (see the module docstring).

  Returns:
    L :class:`~ot_transfer_jax.ot.NeuronTransport`, as L calls of
    ``solve_neuron_ot`` would (``n_iters`` counted as above).

  Raises:
    ValueError: as ``solve_neuron_ot`` does, naming the pair; for
      ``grad="unroll"``; for ``students`` and ``teachers`` (or ``inits``) of
      different lengths, or none.
  """
  if len(students) != len(teachers) or not students:
    raise ValueError(
        f"solve_layers needs one teacher per student layer, and at least "
        f"one pair: got {len(students)} student and {len(teachers)} teacher "
        "activations.")
  if grad != "envelope":
    ot._check_choice("grad", grad, ot.GRAD_MODES)
    raise ValueError(
        f"grad={grad!r} is not offered by the batched solver (its loop cannot "
        "be differentiated in reverse): use solver='per_layer' (Omega_P "
        "option), or solve_neuron_ot for each pair.")
  ot._check_choice("precision", precision, ot.PRECISIONS)
  hint = (f"The default is relative_epsilon={ot.DEFAULT_RELATIVE_EPSILON} "
          "(times mean cost).")
  if epsilon is not None:
    ot._check_positive("epsilon", epsilon, hint)
  ot._check_positive("relative_epsilon", relative_epsilon, hint)
  ot._check_positive("threshold", threshold,
                     "It bounds the L1 marginal error, e.g. threshold=1e-3.")
  max_iterations = ot._check_count("max_iterations", max_iterations)
  block = check_block(block)
  if not isinstance(anneal, (bool, np.bool_)):
    raise ValueError(f"anneal must be True or False, got {anneal!r}.")
  tau = ot.check_tau(tau)
  if inits is not None and len(inits) != len(students):
    raise ValueError(f"inits holds {len(inits)} pairs of potentials for "
                     f"{len(students)} layer pairs: pass one (f, g) per pair "
                     "(a previous solve's .potentials), or None.")

  layers = []
  for i, (s, t) in enumerate(zip(students, teachers)):
    try:
      s, t = ot.check_activations(s, t, spatial, axis_name=axis_name)
      init = None
      if inits is not None:
        ot._check_init(inits[i], s.shape[-1], t.shape[-1])
        init = tuple(ot._replicated(jnp.asarray(p), axis_name)
                     for p in inits[i])
    except ValueError as e:
      raise ValueError(f"Layer pair {i}: {e}") from None
    describe = lambda x: ot.neuron_descriptors(
        x, spatial=spatial, normalize=normalize, axis_name=axis_name)
    a = describe(s)
    t = jax.lax.stop_gradient(describe(t))
    sq_s, sq_t, cross, mean_cost, d = ot._cost_terms(a, t, axis_name,
                                                     precision)
    eps = ot._epsilon(mean_cost, epsilon, relative_epsilon, cross.dtype)
    if epsilon is not None:
      eps = ot._replicated(eps, axis_name)
    # Sinkhorn sees each cost in units of its mean (as the per-layer path).
    unit = jax.lax.stop_gradient(jnp.maximum(mean_cost, ot._TINY))
    scaled = jax.lax.stop_gradient(ot._assemble_cost(sq_s, sq_t, cross,
                                                     d * unit))
    layers.append(_Layer(a, t, scaled, unit, eps, d, init))

  dtype = layers[0].scaled.dtype
  if any(layer.scaled.dtype != dtype for layer in layers):
    raise ValueError("The layer pairs' activations give costs of different "
                     "dtypes (float32 and float64): pass them in one dtype.")
  # As the per-layer path: float64 under jax_enable_x64.
  solve_dtype = jnp.promote_types(dtype, jnp.result_type(float))
  shapes = [layer.scaled.shape for layer in layers]
  costs, epsilons = [], []
  for layer in layers:
    solve_eps = layer.eps / layer.unit
    cost = layer.scaled
    if tau < 1.0:
      # ott-jax's entropy is KL(P | 1 1^T), ours KL(P | u v^T): the cost
      # shift eps log(n_s n_t) (see ot.py's module docstring).
      cost = cost + solve_eps * math.log(cost.shape[0] * cost.shape[1])
    costs.append(cost.astype(solve_dtype))
    epsilons.append(solve_eps.astype(solve_dtype))
  cold = inits is None
  init = None
  if not cold:  # The potentials in units of each cost's mean, padded.
    init = tuple(
        pad_vectors([(layer.init[k] / layer.unit).astype(solve_dtype)
                     for layer in layers], max(shape[k] for shape in shapes))
        for k in (0, 1))
  out = sinkhorn(pad_stack(costs), jnp.stack(epsilons), shapes, init=init,
                 tau=tau, threshold=threshold,
                 max_iterations=ot.iteration_budget(max_iterations, tau),
                 block=block, anneal=anneal and cold)

  results = []
  for i, (layer, cost, solve_eps, (n_s, n_t)) in enumerate(
      zip(layers, costs, epsilons, shapes)):
    f, g = out.f[i, :n_s], out.g[i, :n_t]
    # The plan is built once: value, gradient and matched fraction reuse it.
    plan = jax.lax.stop_gradient(jnp.exp(
        (f[:, None] + g[None, :] - cost) / solve_eps).astype(dtype))
    value = layer.unit * jnp.sum(plan * layer.scaled) + ot.global_sum(
        ot._envelope_gradient(layer.a, layer.t, plan, layer.d, precision,
                              axis_name), axis_name)
    matched = (jnp.trace(plan) if n_s == n_t else
               jnp.asarray(jnp.nan, dtype))
    results.append(ot.NeuronTransport(
        value=value, plan=plan, cost_matrix=layer.scaled * layer.unit,
        matched_fraction=matched, converged=out.converged[i],
        n_iters=out.n_iters[i],
        f=jax.lax.stop_gradient(f.astype(dtype) * layer.unit),
        g=jax.lax.stop_gradient(g.astype(dtype) * layer.unit),
        epsilon=layer.eps, mass=jnp.sum(plan)))
  return tuple(results)
