"""Optimal transport between the neurons of two layers.

A layer's neurons are compared *functionally*: neuron ``j`` is described by the
vector of its activations over the mini-batch (and over spatial positions for a
convolution channel). Between the student's ``n_s`` neurons and the teacher's
``n_t`` neurons we solve an entropic OT problem with uniform marginals and the
squared-Euclidean cost scaled by the descriptor length ``D``::

    C_jk = ||a_j - t_k||^2 / D,      Omega_P = <P*, C>.

The split follows ott-jax: :func:`neuron_descriptors` says *what* is compared,
:func:`cost_matrix` the cost, :func:`solve_neuron_ot` *how* it is solved. All
functions are pure and work under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

Gradient modes (``grad=``), all giving the same forward value:

* ``"envelope"`` (default, the method): ``P*`` is held constant, so
  ``dOmega/dC = P*``. This is the exact gradient of the entropic objective
  ``min_P <P, C> - eps H(P)`` (envelope / Danskin theorem) and costs one GEMM
  backward; nothing is differentiated through the Sinkhorn loop.
* ``"unroll"``: the full derivative of ``<P*(C), C>``, backpropagating
  through every Sinkhorn iteration (memory grows with the iteration count).
  It differs from the envelope gradient by the term that moves ``P*``; it is
  offered for comparison only.

Implicit differentiation (ott-jax ``ImplicitDiff``) is not offered: with
ott-jax 0.6 / lineax its linear solve returned NaN or raised in float32 for
several of our shapes (unequal widths always), even with tight tolerances and
a ridge.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import struct
from ott.geometry import epsilon_scheduler, geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import implicit_differentiation, sinkhorn

Spatial = Literal["flatten", "pool"]
Normalize = Literal["none", "l2", "standardize"]
GradMode = Literal["envelope", "unroll"]

SPATIAL_MODES = ("flatten", "pool")
NORMALIZE_MODES = ("none", "l2", "standardize")
GRAD_MODES = ("envelope", "unroll")

#: Default entropic regularisation, relative to the mean of the cost matrix.
#: At 0.01 the entropic value is within ~1-2 % of exact OT on ReLU features
#: (tests/test_ot.py checks 5 % against POT's exact solver).
DEFAULT_RELATIVE_EPSILON = 0.01

# Epsilon scaling of a cold solve: 20 x 0.85^k reaches 1 at k = 19.
ANNEAL_INIT = 20.0
ANNEAL_DECAY = 0.85
ANNEAL_ITERATIONS = math.ceil(math.log(ANNEAL_INIT) / -math.log(ANNEAL_DECAY))

# Floors that keep degenerate inputs (dead neurons, constant or tiny
# activations) finite: they only matter when a quantity is ~0.
_TINY = 1e-30


@struct.dataclass
class NeuronTransport:
  """The solution of one neuron-to-neuron OT problem (a pytree).

  Attributes:
    value: scalar, ``Omega_P = <P*, C>`` (the transport cost of the entropic
      plan, not the entropic objective). Its gradient depends on ``grad``.
    plan: ``(n_s, n_t)``, the entropic plan ``P*``; sums to 1.
    cost_matrix: ``(n_s, n_t)``, ``C_jk = ||a_j - t_k||^2 / D``.
    matched_fraction: scalar, ``trace(P*)`` when ``n_s == n_t``: the share of
      mass that stays on "each neuron with its counterpart" (1 when the student
      equals the teacher); ``NaN`` for unequal widths.
    converged: scalar bool, Sinkhorn reached ``threshold`` within the budget.
    n_iters: scalar int, Sinkhorn iterations used.
    f: ``(n_s,)`` dual potential of the student's neurons.
    g: ``(n_t,)`` dual potential of the teacher's neurons. ``(f, g)`` can be
      passed back as ``init=`` to warm-start the next solve.
    epsilon: scalar, the absolute entropic regularisation used.
  """

  value: jax.Array
  plan: jax.Array
  cost_matrix: jax.Array
  matched_fraction: jax.Array
  converged: jax.Array
  n_iters: jax.Array
  f: jax.Array
  g: jax.Array
  epsilon: jax.Array

  @property
  def potentials(self) -> Tuple[jax.Array, jax.Array]:
    """``(f, g)``, ready to be passed as ``init=`` to the next solve."""
    return self.f, self.g


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


def check_activation_shapes(
    student_shape: Tuple[int, ...],
    teacher_shape: Tuple[int, ...],
    spatial: str = "flatten",
) -> None:
  """Raises ``ValueError`` unless two activation shapes can be compared.

  Activations are ``(batch, *positions, neurons)``: ``(m, n)`` for a dense
  layer, ``(m, h, w, n)`` for a convolution. Student and teacher must share the
  batch; ``spatial="flatten"`` also needs equal positions (same rank and same
  ``h, w``), ``spatial="pool"`` averages positions away so any may differ.
  """
  _check_choice("spatial", spatial, SPATIAL_MODES)
  given = f"student {tuple(student_shape)}, teacher {tuple(teacher_shape)}"
  for who, shape in (("student", student_shape), ("teacher", teacher_shape)):
    if len(shape) < 2:
      raise ValueError(
          f"Activations must be (batch, [positions...,] neurons); the {who} "
          f"has shape {tuple(shape)} (given: {given}). Add a batch axis, e.g. "
          "x[None] for a single example.")
    if shape[0] == 0 or shape[-1] == 0:
      raise ValueError(f"Empty batch or layer: {given}.")
  if student_shape[0] != teacher_shape[0]:
    raise ValueError(
        f"Student and teacher must see the same mini-batch, but the batch "
        f"sizes differ: {given}. Feed both networks the same examples.")
  if spatial == "flatten" and student_shape[1:-1] != teacher_shape[1:-1]:
    raise ValueError(
        f"spatial='flatten' compares neurons position by position, so the "
        f"positions must match: student positions {tuple(student_shape[1:-1])}"
        f" vs teacher {tuple(teacher_shape[1:-1])} ({given}). Pick layers "
        "with the same resolution and rank, or use spatial='pool' to average "
        "positions away.")


def neuron_descriptors(
    activations: jax.Array,
    *,
    spatial: Spatial = "flatten",
    normalize: Normalize = "none",
) -> jax.Array:
  """Describes each neuron by its activations over the batch.

  Args:
    activations: ``(m, *positions, n)``, e.g. ``(m, n)`` or ``(m, h, w, n)``.
    spatial: ``"flatten"`` keeps every position, ``D = m * h * w``;
      ``"pool"`` averages positions first, ``D = m``.
    normalize: ``"none"``; ``"l2"`` rescales each descriptor to unit root mean
      square (``||a_j|| = sqrt(D)``, so costs lie in ``[0, 4]``);
      ``"standardize"`` gives each descriptor zero mean and unit variance (then
      ``C_jk = 2 (1 - corr_jk)``). Normalising removes scale differences
      between architectures; dead neurons stay zero.

  Returns:
    ``(D, n)``, one column per neuron, float32 (float64 for float64 input).
  """
  _check_choice("spatial", spatial, SPATIAL_MODES)
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  # Low-precision inputs (bfloat16) are computed in float32; float64 stays.
  x = activations.astype(jnp.promote_types(activations.dtype, jnp.float32))
  if spatial == "pool" and x.ndim > 2:
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
  x = x.reshape(-1, x.shape[-1])
  if normalize == "l2":
    # max(., tiny) keeps dead neurons at 0 with a finite gradient.
    rms = jnp.sqrt(jnp.maximum(jnp.mean(x * x, axis=0), _TINY))
    x = x / rms
  elif normalize == "standardize":
    x = x - jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.maximum(jnp.mean(x * x, axis=0), _TINY))
    x = x / std
  return x


def cost_matrix(student_desc: jax.Array, teacher_desc: jax.Array) -> jax.Array:
  """Mean squared difference between every pair of neuron descriptors.

  Args:
    student_desc: ``(D, n_s)``.
    teacher_desc: ``(D, n_t)``.

  Returns:
    ``(n_s, n_t)`` with ``C_jk = ||a_j - t_k||^2 / D``, computed with one GEMM
    (``|a|^2 + |t|^2 - 2 a.t``) and clipped at 0 against round-off.
  """
  d = student_desc.shape[0]
  sq_s = jnp.sum(student_desc * student_desc, axis=0)
  sq_t = jnp.sum(teacher_desc * teacher_desc, axis=0)
  cross = jnp.matmul(student_desc.T, teacher_desc,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(sq_s[:, None] + sq_t[None, :] - 2.0 * cross, 0.0) / d


def _epsilon(cost: jax.Array, epsilon: Optional[float],
             relative_epsilon: float) -> jax.Array:
  """Absolute epsilon; the relative default follows the cost scale."""
  if epsilon is not None:
    return jnp.asarray(epsilon, jnp.float32)
  # The plan is a constant of the regulariser, and so is its temperature.
  scale = jax.lax.stop_gradient(jnp.mean(cost))
  return relative_epsilon * jnp.maximum(scale, _TINY)


def _solver(grad: str, threshold: float, max_iterations: int,
            inner_iterations: int, min_iterations: int) -> sinkhorn.Sinkhorn:
  return sinkhorn.Sinkhorn(
      lse_mode=True,
      threshold=threshold,
      max_iterations=max_iterations,
      inner_iterations=inner_iterations,
      min_iterations=min_iterations,
      # None: a loop that "unroll" can backpropagate through. "envelope"
      # feeds the solver constants, so nothing is ever differentiated there.
      implicit_diff=None if grad == "unroll" else
      implicit_differentiation.ImplicitDiff(),
  )


def solve_neuron_ot(
    student: jax.Array,
    teacher: jax.Array,
    *,
    epsilon: Optional[float] = None,
    relative_epsilon: float = DEFAULT_RELATIVE_EPSILON,
    spatial: Spatial = "flatten",
    normalize: Normalize = "none",
    threshold: float = 1e-3,
    max_iterations: int = 2000,
    inner_iterations: Optional[int] = None,
    anneal: bool = True,
    grad: GradMode = "envelope",
    init: Optional[Tuple[jax.Array, jax.Array]] = None,
) -> NeuronTransport:
  """Entropic OT between a student layer's and a teacher layer's neurons.

  Args:
    student: ``(m, *positions, n_s)`` activations (any float dtype; computed in
      float32).
    teacher: ``(m, *positions', n_t)`` activations of the same batch. Treated as
      a constant (``stop_gradient``).
    epsilon: absolute entropic regularisation; overrides ``relative_epsilon``.
    relative_epsilon: ``epsilon = relative_epsilon * mean(C)`` when ``epsilon``
      is None, so the plan's sharpness does not depend on the activations'
      scale.
    spatial, normalize: how neurons are described, see
      :func:`neuron_descriptors`.
    threshold: Sinkhorn stops when the L1 marginal error is below this.
    max_iterations: iteration budget (a bound, not a target).
    inner_iterations: iterations between two convergence checks (each check
      costs about one iteration). Default: 10 from a cold start, 2 from a
      warm one, which typically converges within a few iterations.
    anneal: epsilon scaling on a cold start (``init`` None): epsilon starts at
      ``ANNEAL_INIT`` times its target and decays by ``ANNEAL_DECAY`` per
      iteration, reaching the target after ``ANNEAL_ITERATIONS``; the solve
      runs at least that long. It cuts a cold solve's iterations 2-3 fold at
      small epsilon. Warm starts always use the target epsilon.
    grad: ``"envelope"`` (default) or ``"unroll"``; see the
      module docstring.
    init: ``(f, g)`` potentials of a previous solve, ``(n_s,)`` and ``(n_t,)``,
      to warm-start Sinkhorn (plans move slowly between training steps).

  Returns:
    A :class:`NeuronTransport`.

  Raises:
    ValueError: for shapes that cannot be compared (see
      :func:`check_activation_shapes`), an unknown option, or a non-positive
      ``epsilon``.
  """
  check_activation_shapes(student.shape, teacher.shape, spatial)
  _check_choice("grad", grad, GRAD_MODES)
  for name, val in (("epsilon", epsilon), ("relative_epsilon",
                                           relative_epsilon)):
    if isinstance(val, (int, float)) and not (val > 0 and math.isfinite(val)):
      raise ValueError(
          f"{name} must be a positive finite number, got {val!r}. The default "
          f"is relative_epsilon={DEFAULT_RELATIVE_EPSILON} (times mean cost).")
  a = neuron_descriptors(student, spatial=spatial, normalize=normalize)
  t = jax.lax.stop_gradient(
      neuron_descriptors(teacher, spatial=spatial, normalize=normalize))
  cost = cost_matrix(a, t)
  eps = _epsilon(cost, epsilon, relative_epsilon)

  envelope = grad == "envelope"
  geom_cost = jax.lax.stop_gradient(cost) if envelope else cost
  cold = init is None
  annealing = anneal and cold
  if inner_iterations is None:
    inner_iterations = 10 if cold else 2
  schedule = (epsilon_scheduler.Epsilon(eps, ANNEAL_INIT, ANNEAL_DECAY)
              if annealing else eps)
  geom = geometry.Geometry(cost_matrix=geom_cost, epsilon=schedule)
  out = _solver(grad, threshold, max_iterations, inner_iterations,
                ANNEAL_ITERATIONS if annealing else 0)(
                    linear_problem.LinearProblem(geom), init=init)
  plan = out.matrix
  if envelope:
    plan = jax.lax.stop_gradient(plan)
  value = jnp.sum(plan * cost)

  n_s, n_t = cost.shape
  matched = jnp.trace(plan) if n_s == n_t else jnp.asarray(jnp.nan, jnp.float32)
  return NeuronTransport(
      value=value,
      plan=plan,
      cost_matrix=cost,
      matched_fraction=jax.lax.stop_gradient(matched),
      converged=out.converged,
      n_iters=out.n_iters,
      f=jax.lax.stop_gradient(out.f),
      g=jax.lax.stop_gradient(out.g),
      epsilon=eps,
  )
