"""Optimal transport between the neurons of two layers.

A layer's neurons are compared *functionally*: neuron ``j`` is described by the
vector of its activations over the mini-batch (and over spatial positions for a
convolution channel). Between the student's ``n_s`` neurons and the teacher's
``n_t`` neurons we solve an entropic OT problem with uniform marginals and the
squared-Euclidean cost scaled by the descriptor length ``D``::

    C_jk = ||a_j - t_k||^2 / D,      Omega_P = <P*, C>.

The split follows ott-jax: :func:`neuron_descriptors` says *what* is compared,
:func:`cost_matrix` the cost, :func:`solve_neuron_ot` *how* it is solved. Its
options come in two frozen dataclasses, as ott-jax separates ``LinearProblem``
and ``Sinkhorn``: :class:`NeuronProblem` (what is solved: the descriptors,
epsilon, ``tau``, the GEMM's precision, the device axis) and
:class:`SinkhornOptions` (how: threshold, iteration budget, epsilon scaling,
Anderson acceleration, gradient mode). The keywords of
:func:`solve_neuron_ot` (and of ``ot_regularizer``) are the convenient form of
the same fields::

    solve_neuron_ot(s, t, relative_epsilon=0.02, threshold=1e-4)
    solve_neuron_ot(s, t, problem=NeuronProblem(relative_epsilon=0.02),
                    sinkhorn=SinkhornOptions(threshold=1e-4))  # the same

All functions are pure and work under ``jax.jit``, ``jax.grad`` and
``jax.vmap``. The input checks live in :mod:`ot_transfer_jax._validation`
(the public ones re-exported here), the sums over devices in
:mod:`ot_transfer_jax.collectives`.

Gradient modes (``grad=``), all giving the same forward value:

* ``"envelope"`` (default, the method): ``P*`` is held constant, so
  ``dOmega/dC = P*``. This is the exact gradient of the entropic objective
  ``min_P <P, C> - eps H(P)`` (envelope / Danskin theorem). It is given in
  closed form by a ``custom_vjp``, ``dOmega/da_j = (2/D) sum_k P_jk (a_j -
  t_k)``: one GEMM backward from the plan of the forward pass; nothing is
  differentiated through the cost matrix or the Sinkhorn loop.
* ``"unroll"``: the full derivative of ``<P*(C), C>``, backpropagating
  through every Sinkhorn iteration (memory grows with the iteration count).
  It differs from the envelope gradient by the term that moves ``P*``; it is
  offered for comparison only.

Unbalanced transport (``tau < 1``): the marginal constraints become KL
penalties, so a neuron may stay (partly) unmatched at a price. With ott-jax's
parametrisation ``tau = rho / (rho + eps)`` (``LinearProblem(tau_a=tau,
tau_b=tau)``), the plan solves::

    P* = argmin_P <P, C> + eps KL(P | u v^T) + rho KL(P 1 | u) + rho KL(P^T 1 | v)

(``u``, ``v`` the uniform marginals, KL the generalised divergence
``sum p log(p / q) - p + q``, ``rho = eps tau / (1 - tau)``: ``tau`` is
scale-free like ``relative_epsilon``); ``tau = 1`` is the balanced problem.
(ott-jax's entropic term is ``KL(P | 1 1^T)``; the cost is shifted by ``eps
log(n_s n_t)`` to solve the problem above, POT's ``reg_type="kl"``.) Omega_P is still the transport cost
``<P*, C>`` of that plan (its mass ``sum(P*)`` may be below 1, see
``NeuronTransport.mass``), and the envelope gradient is still ``dOmega/dC =
P*``: by Danskin's theorem the exact gradient of the unbalanced entropic
objective above (the transport cost's own gradient would add the term that
moves ``P*``, as in the balanced case). ``tests/test_ot.py`` checks the value
against POT's ``ot.unbalanced.sinkhorn_unbalanced2`` (``reg=eps``, ``reg_m=
rho``, ``returnCost="linear"``) and the gradient against finite differences of
the objective above at POT's plan.

Implicit differentiation (ott-jax ``ImplicitDiff``) is not offered: with
ott-jax 0.6 / lineax its linear solve returned NaN or raised in float32 for
several of our shapes (unequal widths always), even with tight tolerances and
a ridge.

Global batch across devices (``axis_name=``): inside ``jax.pmap`` or
``jax.shard_map`` with the batch split over an axis, every function here takes
``axis_name`` and computes the quantity of the *global* batch. The cost is a
sum over the batch (``|a|^2 + |t|^2 - 2 a.t``), so each device computes its
partial ``n_s x n_t`` terms (and normalisation statistics) and one ``psum``
gives the global ones; every device then solves the same small OT problem.
Gradient convention: JAX's own rules for ``psum``, so Omega_P behaves like
any ``lax.pmean``-reduced loss. Under ``shard_map`` its gradient with respect
to a device's shard of the activations is exactly that shard's part of the
gradient of the global Omega_P (concatenated over devices: the single-device
gradient on the global batch), and gradients of replicated ``P()`` parameters
come out summed over devices. Under ``pmap`` -- where every device's copy of a
replicated value counts, so ``psum``'s transpose sums the cotangents -- the
per-device gradient is ``axis_size`` times that part; the usual ``pmap``
recipe (per-device loss ``task + alpha * Omega_P``, then ``lax.pmean`` of the
gradients) therefore gives the exact global gradient. Taking ``jax.grad``
outside ``pmap``, of one device's output, gives the per-shard part itself.
``shard_map(..., check_vma=False)`` follows ``pmap``'s rule.

Without ``axis_name`` inside ``shard_map``, activations that vary across a
mesh axis (a batch split over it) are refused with a ``ValueError`` naming the
axis to pass (:func:`~ot_transfer_jax.collectives.check_axis_name`). Under
``pmap`` and ``shard_map(..., check_vma=False)``, where values carry no such
type, every function computes the per-device value: that of the device's own
shard.

Precision: activations are computed in float32 (bfloat16 promoted), float64
stays float64. Under ``jax_enable_x64`` the small ``n_s x n_t`` Sinkhorn solve
of float32 activations runs in float64 (ott-jax builds part of its state in
the default float type) and its results come back in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ot_transfer_jax._validation import (  # noqa: F401 (re-exported)
    GRAD_MODES,
    NORMALIZE_MODES,
    PRECISIONS,
    SPATIAL_MODES,
    GradMode,
    Normalize,
    Precision,
    Spatial,
    as_array,
    check_activation_shapes,
    check_activations,
    check_choice,
    check_count,
    check_init,
    check_positive,
    check_tau,
)
from ot_transfer_jax.collectives import (
    AxisName,
    axis_size,
    check_axis_name,
    global_sum,
    replicated,
)

# ott-jax is imported by the functions that solve, not here: it imports
# jaxopt and scipy.optimize, which took 8 of the 21 s `import ot_transfer_jax`
# took on a loaded machine; the descriptors, costs and baselines need none.

_LAX_PRECISION = {"highest": jax.lax.Precision.HIGHEST,
                  "high": jax.lax.Precision.HIGH,
                  "default": jax.lax.Precision.DEFAULT}

#: Default entropic regularisation, relative to the mean of the cost matrix.
#: At 0.01 the entropic value is within ~1-2 % of exact OT on ReLU features
#: (tests/test_ot.py checks 5 % against POT's exact solver).
DEFAULT_RELATIVE_EPSILON = 0.01

# Epsilon scaling of a cold solve: 20 x 0.85^k reaches 1 at k = 19.
ANNEAL_INIT = 20.0
ANNEAL_DECAY = 0.85
ANNEAL_ITERATIONS = math.ceil(math.log(ANNEAL_INIT) / -math.log(ANNEAL_DECAY))

#: Anderson acceleration: with 3 past potentials, cold solves take 2-4x fewer
#: iterations for the same value (64-2048 neurons, relative_epsilon 0.005).
DEFAULT_ANDERSON_MEMORY = 3

#: Iterations an unbalanced solve (``tau < 1``) gets on top of
#: ``max_iterations``, per unit of ``rho / eps = tau / (1 - tau)``: see
#: :func:`iteration_budget`.
UNBALANCED_ITERATIONS_PER_RHO = 5

#: Floor that keeps degenerate inputs (dead neurons, constant or tiny
#: activations) finite: it only matters when a quantity is ~0.
TINY = 1e-30

_EPSILON_HINT = (f"The default is relative_epsilon={DEFAULT_RELATIVE_EPSILON} "
                 "(times mean cost).")


# ---------------------------------------------------------------------------
# Options: the problem, and how it is solved
# ---------------------------------------------------------------------------


class Comparison(NamedTuple):
  """How two layers' neurons are described and compared (hashable: a
  static part of :class:`NeuronTransport`)."""

  spatial: str
  normalize: str
  precision: str
  axis_name: Any


@dataclasses.dataclass(frozen=True)
class NeuronProblem:
  """What is solved: the OT problem between two layers' neurons.

  Checked when built (a ``ValueError`` naming the option and the fix);
  ``epsilon`` and ``relative_epsilon`` may be traced values (they are
  arguments, not constants, of the compiled solve), the rest must be
  concrete.

  Attributes:
    spatial: ``"flatten"`` or ``"pool"``, how positions enter the neurons'
      descriptors, see :func:`neuron_descriptors`.
    normalize: ``"none"``, ``"l2"`` or ``"standardize"``, see
      :func:`neuron_descriptors`.
    epsilon: absolute entropic regularisation; overrides
      ``relative_epsilon``.
    relative_epsilon: ``epsilon = relative_epsilon * mean(C)`` when
      ``epsilon`` is None, so the plan's sharpness does not depend on the
      activations' scale.
    tau: in (0, 1]; 1 (default) is balanced transport, every neuron's mass
      matched. Below 1 the marginals are KL penalties of weight ``rho = eps
      tau / (1 - tau)`` (ott-jax's ``tau_a = tau_b = tau``): neurons with no
      good counterpart keep part of their mass unmatched (see the module
      docstring for the value and gradient). ``rho`` scales with epsilon: at
      the default ``relative_epsilon=0.01``, ``tau=0.99`` prices unmatched
      mass at about the mean cost, while ``tau=0.9`` (``rho`` = 0.09 x mean
      cost) already leaves most of the mass unmatched. A concrete number.
    precision: of the cost matrix's GEMM (and the envelope gradient's):
      ``"highest"`` (default, full float32), ``"high"``, ``"default"`` (the
      backend's fastest: TF32 / bf16 passes on GPUs and TPUs),
      ``"bfloat16"`` (operands cast to bfloat16, float32 accumulation).
    axis_name: inside ``jax.pmap`` / ``jax.shard_map`` with the batch
      sharded over this axis (or tuple of axes), solve the OT problem of the
      *global* batch: each device's partial cost terms are summed with one
      ``psum`` and every device solves the same ``n_s x n_t`` problem. The
      value is replicated; the gradient is the per-shard gradient of the
      global Omega_P (see the module docstring for what to ``psum``
      afterwards). A list is stored as a tuple.
  """

  spatial: Spatial = "flatten"
  normalize: Normalize = "none"
  epsilon: Optional[float] = None
  relative_epsilon: float = DEFAULT_RELATIVE_EPSILON
  tau: float = 1.0
  precision: Precision = "highest"
  axis_name: AxisName = None

  def __post_init__(self):
    check_choice("spatial", self.spatial, SPATIAL_MODES)
    check_choice("normalize", self.normalize, NORMALIZE_MODES)
    check_choice("precision", self.precision, PRECISIONS)
    if self.epsilon is not None:
      check_positive("epsilon", self.epsilon, _EPSILON_HINT)
    check_positive("relative_epsilon", self.relative_epsilon, _EPSILON_HINT)
    object.__setattr__(self, "tau", check_tau(self.tau))
    if isinstance(self.axis_name, list):  # Hashable: a static option.
      object.__setattr__(self, "axis_name", tuple(self.axis_name))

  @property
  def comparison(self) -> Comparison:
    """The options that define the cost matrix (not epsilon, not tau)."""
    return Comparison(self.spatial, self.normalize, self.precision,
                      self.axis_name)


@dataclasses.dataclass(frozen=True)
class SinkhornOptions:
  """How the problem is solved: ott-jax's log-domain Sinkhorn, configured.

  Checked when built; ``threshold`` may be a traced value, the rest are
  static (they shape the compiled loop).

  Attributes:
    threshold: Sinkhorn stops when the L1 marginal error is below this.
    max_iterations: iteration budget of balanced transport (a bound, not a
      target); an unbalanced solve gets ``ceil(5 tau / (1 - tau))`` more
      (6,995 in all at ``tau=0.999``), see :func:`iteration_budget`. Whether
      the solve converged within it is ``converged`` (and ``n_iters``).
    inner_iterations: iterations between two convergence checks (each check
      costs about one iteration). None: 10 from a cold start, 2 from a warm
      one, which typically converges within a few iterations.
    anneal: epsilon scaling on a cold start (no ``init``): epsilon starts at
      ``ANNEAL_INIT`` times its target and decays by ``ANNEAL_DECAY`` per
      iteration, reaching the target after ``ANNEAL_ITERATIONS``; the solve
      runs at least that long. It cuts a cold solve's iterations 2-3 fold at
      small epsilon. Warm starts always use the target epsilon.
    anderson: memory of the Anderson acceleration (``grad="envelope"``
      only): from iteration ``anderson + 1`` on, each iteration extrapolates
      from the last ``anderson`` potentials. 3 cuts a cold solve's
      iterations 2-4 fold at the same accuracy; warm starts that converge
      within ``anderson`` iterations are unaffected. 0 turns it off.
    grad: ``"envelope"`` (default) or ``"unroll"``; see the module
      docstring.
  """

  threshold: float = 1e-3
  max_iterations: int = 2000
  inner_iterations: Optional[int] = None
  anneal: bool = True
  anderson: int = DEFAULT_ANDERSON_MEMORY
  grad: GradMode = "envelope"

  def __post_init__(self):
    check_choice("grad", self.grad, GRAD_MODES)
    check_positive("threshold", self.threshold,
                   "It bounds the L1 marginal error, e.g. threshold=1e-3.")
    object.__setattr__(self, "max_iterations",
                       check_count("max_iterations", self.max_iterations))
    if self.inner_iterations is not None:
      object.__setattr__(self, "inner_iterations", check_count(
          "inner_iterations", self.inner_iterations))
    if isinstance(self.anderson, (bool, np.bool_)) or not isinstance(
        self.anderson, (int, np.integer)) or self.anderson < 0:
      raise ValueError(
          f"anderson must be an integer >= 0 (0: off), got "
          f"{self.anderson!r}. The default is {DEFAULT_ANDERSON_MEMORY}.")
    object.__setattr__(self, "anderson", int(self.anderson))
    if not isinstance(self.anneal, (bool, np.bool_)):
      raise ValueError(f"anneal must be True or False, got {self.anneal!r}.")
    object.__setattr__(self, "anneal", bool(self.anneal))


#: The keywords of :func:`solve_neuron_ot`: the two dataclasses' fields.
PROBLEM_OPTIONS = tuple(f.name for f in dataclasses.fields(NeuronProblem))
SINKHORN_OPTIONS = tuple(f.name for f in dataclasses.fields(SinkhornOptions))


def make_options(problem: Optional[NeuronProblem] = None,
                 sinkhorn: Optional[SinkhornOptions] = None,
                 *, caller: str = "solve_neuron_ot",
                 **options: Any) -> Tuple[NeuronProblem, SinkhornOptions]:
  """``(problem, sinkhorn)`` from the convenient keywords.

  Args:
    problem, sinkhorn: the options as dataclasses (None: the defaults).
    caller: the function named in an error message.
    **options: fields of either dataclass; they override ``problem``'s and
      ``sinkhorn``'s.

  Raises:
    TypeError: a keyword that is neither dataclass's field (as Python does
      for an unexpected keyword), or ``problem`` / ``sinkhorn`` of the wrong
      type.
    ValueError: an invalid option value (see the dataclasses).
  """
  unknown = sorted(set(options) - set(PROBLEM_OPTIONS) - set(SINKHORN_OPTIONS))
  if unknown:
    raise TypeError(
        f"{caller}() got unexpected keyword argument(s) {unknown}; its "
        f"options are the fields of NeuronProblem {PROBLEM_OPTIONS} and of "
        f"SinkhornOptions {SINKHORN_OPTIONS}.")
  for name, value, cls in (("problem", problem, NeuronProblem),
                           ("sinkhorn", sinkhorn, SinkhornOptions)):
    if value is not None and not isinstance(value, cls):
      raise TypeError(f"{caller}(): {name} must be an ot.{cls.__name__}, "
                      f"got {type(value).__name__}.")

  def build(cls, given, names):
    fields = {k: options[k] for k in names if k in options}
    if given is None:
      return cls(**fields)
    return dataclasses.replace(given, **fields) if fields else given

  return (build(NeuronProblem, problem, PROBLEM_OPTIONS),
          build(SinkhornOptions, sinkhorn, SINKHORN_OPTIONS))


# ---------------------------------------------------------------------------
# The solution
# ---------------------------------------------------------------------------


@struct.dataclass
class NeuronTransport:
  """The solution of one neuron-to-neuron OT problem (a pytree).

  Attributes:
    value: scalar, ``Omega_P = <P*, C>`` (the transport cost of the entropic
      plan, not the entropic objective). Its gradient depends on ``grad``.
    plan: ``(n_s, n_t)``, the entropic plan ``P*``; sums to 1 (``mass``
      when ``tau < 1``).
    matched_fraction: scalar, ``trace(P*)`` when ``n_s == n_t``: the share of
      mass that stays on "each neuron with its counterpart" (1 when the student
      equals the teacher); ``NaN`` for unequal widths.
    converged: scalar bool, Sinkhorn reached ``threshold`` within the budget.
    n_iters: scalar int, Sinkhorn iterations used.
    f: ``(n_s,)`` dual potential of the student's neurons.
    g: ``(n_t,)`` dual potential of the teacher's neurons. ``(f, g)`` can be
      passed back as ``init=`` to warm-start the next solve.
    epsilon: scalar, the absolute entropic regularisation used.
    mass: scalar, ``sum(P*)``: 1 for balanced transport (up to
      ``threshold``), the share of mass transported when ``tau < 1``.
    comparison: static (not a leaf), how the neurons were described and
      compared: what :meth:`cost_matrix` needs besides the activations.
  """

  value: jax.Array
  plan: jax.Array
  matched_fraction: jax.Array
  converged: jax.Array
  n_iters: jax.Array
  f: jax.Array
  g: jax.Array
  epsilon: jax.Array
  mass: jax.Array
  comparison: Comparison = struct.field(
      pytree_node=False, default=Comparison("flatten", "none", "highest",
                                            None))

  @property
  def potentials(self) -> Tuple[jax.Array, jax.Array]:
    """``(f, g)``, ready to be passed as ``init=`` to the next solve."""
    return self.f, self.g

  def cost_matrix(self, student: jax.Array, teacher: jax.Array) -> jax.Array:
    """``(n_s, n_t)``, ``C_jk = ||a_j - t_k||^2 / D``: the cost this plan
    was solved for, computed when asked (a solve returns the plan, not the
    cost, so an eager solve does not build a second ``n_s x n_t`` output).

    Args:
      student: the student activations that were solved, ``(m,
        *positions, n_s)``.
      teacher: the teacher's, ``(m, *positions', n_t)``. Under
        ``axis_name=``, call it where the solve ran (inside the same
        ``pmap`` / ``shard_map``).

    Raises:
      ValueError: activations that cannot be compared, or of other widths
        than the plan's.
    """
    spatial, _, _, axis_name = self.comparison
    student, teacher = check_activations(student, teacher, spatial,
                                         axis_name=axis_name)
    widths = (student.shape[-1], teacher.shape[-1])
    if widths != tuple(self.plan.shape):
      raise ValueError(
          f"These activations have {widths[0]} student and {widths[1]} "
          f"teacher neurons, but the plan is {tuple(self.plan.shape)}: pass "
          "the student and teacher activations this transport was solved "
          "for.")
    return _scaled_cost(student, teacher, **self.comparison._asdict())


def iteration_budget(max_iterations: int, tau: float) -> int:
  """The Sinkhorn iterations a solve may take: ``max_iterations`` when
  ``tau == 1``, else ``max_iterations + ceil(5 rho / eps)``.

  Why it scales with ``rho / eps = tau / (1 - tau)``: each unbalanced update
  multiplies the potential it computes by ``tau``, so a shift of the
  potentials that leaves the cost unchanged (the mass of a group of neurons
  with near-equal costs, which balanced Sinkhorn need not resolve) decays only
  by ``tau^2`` per iteration: from an O(1) error to the default threshold
  ``1e-3`` that takes about ``ln(2000) / (2 (1 - tau))``, i.e. 3.8 rho / eps,
  iterations. (The global shift is removed exactly each iteration, see
  ``recenter_potentials`` in :func:`solve_neuron_ot`; groups are not.)
  Measured on ReLU features (48 vs 32, 32 vs 48, 64 vs 64 neurons, batch
  64-128, 3 seeds), ``tau=0.999``: at most 4,190 iterations without that
  recentering, at most 1,440 with it (30-40 on uncorrelated features), so
  the 6,995 of the default budget leave a margin; balanced solves are
  unaffected. The budget is a bound: a solve that converges stops there.

  Args:
    max_iterations: the budget of balanced transport, an integer >= 1.
    tau: in (0, 1], see :func:`solve_neuron_ot`.
  """
  if tau >= 1.0:
    return max_iterations
  # Rounded first: 5 * 0.9 / (1 - 0.9) is 45.000000000000014 in floats.
  return max_iterations + math.ceil(
      round(UNBALANCED_ITERATIONS_PER_RHO * tau / (1.0 - tau), 6))

# ---------------------------------------------------------------------------
# Descriptors -> cost
# ---------------------------------------------------------------------------


def neuron_descriptors(
    activations: jax.Array,
    *,
    spatial: Spatial = "flatten",
    normalize: Normalize = "none",
    axis_name: AxisName = None,
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
    axis_name: the batch is sharded over this ``pmap`` / ``shard_map`` axis;
      the normalisation statistics are then those of the global batch.

  Returns:
    ``(D, n)``, one column per neuron (this device's rows of the global
    descriptors under ``axis_name``), float32 (float64 for float64 input).
  """
  check_choice("spatial", spatial, SPATIAL_MODES)
  check_choice("normalize", normalize, NORMALIZE_MODES)
  activations = as_array(activations, "layer")
  check_axis_name(axis_name, layer=activations)
  # Low-precision inputs (bfloat16) are computed in float32; float64 stays.
  x = activations.astype(jnp.promote_types(activations.dtype, jnp.float32))
  if spatial == "pool" and x.ndim > 2:
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
  x = x.reshape(-1, x.shape[-1])
  d = x.shape[0] * axis_size(axis_name)

  def column_mean(y):
    return global_sum(jnp.sum(y, axis=0), axis_name) / d

  if normalize == "l2":
    # max(., tiny) keeps dead neurons at 0 with a finite gradient.
    rms = jnp.sqrt(jnp.maximum(column_mean(x * x), TINY))
    x = x / rms
  elif normalize == "standardize":
    x = x - column_mean(x)
    std = jnp.sqrt(jnp.maximum(column_mean(x * x), TINY))
    x = x / std
  return x


def _matmul(x: jax.Array, y: jax.Array, precision: str) -> jax.Array:
  """``x @ y`` accumulated in float32 at the given ``PRECISIONS`` entry."""
  if precision == "bfloat16":
    return jnp.matmul(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32).astype(x.dtype)
  return jnp.matmul(x, y, precision=_LAX_PRECISION[precision])


def cost_matrix(student_desc: jax.Array, teacher_desc: jax.Array, *,
                axis_name: AxisName = None,
                precision: Precision = "highest") -> jax.Array:
  """Mean squared difference between every pair of neuron descriptors.

  Args:
    student_desc: ``(D, n_s)``.
    teacher_desc: ``(D, n_t)``.
    axis_name: the rows ``D`` are sharded over this device axis: each device
      computes its partial ``|a|^2``, ``|t|^2`` and ``a.t`` and one ``psum``
      gives the global matrix (``n_s x n_t`` floats communicated).
    precision: of the ``a.t`` GEMM, see ``PRECISIONS``.

  Returns:
    ``(n_s, n_t)`` with ``C_jk = ||a_j - t_k||^2 / D``, computed with one GEMM
    (``|a|^2 + |t|^2 - 2 a.t``) and clipped at 0 against round-off; the same
    on every device.
  """
  student_desc = as_array(student_desc, "student")
  teacher_desc = as_array(teacher_desc, "teacher")
  check_axis_name(axis_name, student=student_desc, teacher=teacher_desc)
  sq_s, sq_t, cross, _, d = _cost_terms(student_desc, teacher_desc, axis_name,
                                        precision)
  return _assemble_cost(sq_s, sq_t, cross, d)


def _cost_terms(a: jax.Array, t: jax.Array, axis_name: AxisName,
                precision: str):
  """The global sums behind :func:`cost_matrix`, with one ``psum``.

  Returns ``(|a_j|^2 (n_s,), |t_k|^2 (n_t,), a.t (n_s, n_t), mean_jk C_jk,
  D)``. The mean comes from the same sums in O(D (n_s + n_t)), sparing a pass
  over the ``n_s x n_t`` matrix: mean_jk a_j.t_k = (sum_j a_j).(sum_k t_k) /
  (n_s n_t). (It ignores the clipping at 0, i.e. round-off.)
  """
  check_choice("precision", precision, PRECISIONS)
  (d_local, n_s), n_t = a.shape, t.shape[1]
  d = d_local * axis_size(axis_name)
  sq_s, sq_t, cross, cross_total = global_sum(
      (jnp.sum(a * a, axis=0), jnp.sum(t * t, axis=0),
       _matmul(a.T, t, precision),
       jnp.vdot(jnp.sum(a, axis=1), jnp.sum(t, axis=1))), axis_name)
  mean = (jnp.mean(sq_s) + jnp.mean(sq_t) - 2.0 * cross_total /
          (n_s * n_t)) / d
  return sq_s, sq_t, cross, mean, d


def _assemble_cost(sq_s, sq_t, cross, divisor):
  """``max(|a|^2 + |t|^2 - 2 a.t, 0) / divisor`` (clipped against round-off)."""
  return jnp.maximum(sq_s[:, None] + sq_t[None, :] - 2.0 * cross,
                     0.0) / divisor


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _envelope_gradient(a, t, plan, d, precision, axis_name):
  """Zero, with the envelope gradient of ``<plan, C(a, t)>`` in ``a``.

  ``value = stop_gradient(<P, C>) + global_sum(_envelope_gradient(...))``:
  the forward pass needs nothing more than the plan, the backward pass is
  one GEMM, and the ``psum`` routes the cotangent by JAX's own rules.
  """
  del t, plan, d, precision, axis_name
  # A zero computed from ``a``, so that it is batched under vmap and varies
  # across the mesh like ``a``: a constant would collect the cotangents of
  # every batch member (or device) and scale the gradient by their number.
  return 0.0 * a[0, 0]


def _envelope_gradient_fwd(a, t, plan, d, precision, axis_name):
  return _envelope_gradient(a, t, plan, d, precision, axis_name), (a, t, plan)


def _envelope_gradient_bwd(d, precision, axis_name, residuals, cotangent):
  # C_jk = |a_j - t_k|^2 / D, so dOmega/da_j = (2/D) sum_k P_jk (a_j - t_k):
  # one GEMM, on this device's rows only (the plan is global).
  del axis_name
  a, t, plan = residuals
  grad = a * jnp.sum(plan, axis=1) - _matmul(t, plan.T, precision)
  return (cotangent * (2.0 / d) * grad, None, None)


_envelope_gradient.defvjp(_envelope_gradient_fwd, _envelope_gradient_bwd)


def _epsilon(mean_cost: jax.Array, epsilon: Any, relative_epsilon: Any,
             dtype) -> jax.Array:
  """Absolute epsilon; NaN when a traced value turns out invalid."""
  if epsilon is not None:
    eps = jnp.asarray(epsilon, dtype)
  else:
    # The plan is a constant of the regulariser, and so is its temperature.
    scale = jax.lax.stop_gradient(mean_cost)
    eps = jnp.asarray(relative_epsilon, dtype) * jnp.maximum(scale, TINY)
  # Concrete values were checked up front; a traced invalid one poisons the
  # solve (NaN value, converged=False) instead of returning a plausible value.
  return jnp.where((eps > 0) & jnp.isfinite(eps), eps, jnp.nan)


# ---------------------------------------------------------------------------
# The pieces both solvers share: scaled problem in, transport out
# ---------------------------------------------------------------------------


class ScaledProblem(NamedTuple):
  """One layer pair's OT problem as the Sinkhorn loop sees it.

  Attributes:
    a: ``(D, n_s)`` student descriptors (this device's rows).
    t: ``(D, n_t)`` teacher descriptors (a constant).
    cost: ``(n_s, n_t)`` cost matrix in units of its mean: ``C / unit``.
    unit: scalar, the mean cost ``mean(C)`` (floored at ``TINY``), a
      constant: Sinkhorn sees the cost in these units, so that its numbers
      (and Anderson's extrapolation, which is not scale-free) do not depend
      on the activations' scale; the plan is the same.
    epsilon: scalar, the absolute epsilon (NaN when a traced value is
      invalid).
    d: the descriptor length ``D`` of the global batch (static).
  """

  a: jax.Array
  t: jax.Array
  cost: jax.Array
  unit: jax.Array
  epsilon: jax.Array
  d: int


def scale_problem(student: jax.Array, teacher: jax.Array,
                  problem: NeuronProblem) -> ScaledProblem:
  """Descriptors, cost in units of its mean and epsilon of checked
  activations (:func:`check_activations`), with one ``psum`` under
  ``problem.axis_name``. The teacher's side is a constant."""
  describe = functools.partial(neuron_descriptors, spatial=problem.spatial,
                               normalize=problem.normalize,
                               axis_name=problem.axis_name)
  a = describe(student)
  t = jax.lax.stop_gradient(describe(teacher))
  sq_s, sq_t, cross, mean_cost, d = _cost_terms(a, t, problem.axis_name,
                                                problem.precision)
  eps = _epsilon(mean_cost, problem.epsilon, problem.relative_epsilon,
                 cross.dtype)
  if problem.epsilon is not None:
    eps = replicated(eps, problem.axis_name)
  unit = jax.lax.stop_gradient(jnp.maximum(mean_cost, TINY))
  return ScaledProblem(a, t, _assemble_cost(sq_s, sq_t, cross, d * unit),
                       unit, eps, d)


def transport_from_solution(scaled: ScaledProblem, plan: jax.Array,
                            f: jax.Array, g: jax.Array, converged: jax.Array,
                            n_iters: jax.Array, problem: NeuronProblem, *,
                            envelope: bool) -> NeuronTransport:
  """The :class:`NeuronTransport` of a solved :class:`ScaledProblem`.

  Args:
    scaled: the problem (``scaled.cost`` a constant when ``envelope``).
    plan: ``(n_s, n_t)`` in the cost's dtype; built once, it gives the
      value, the gradient, the matched fraction and the mass.
    f, g: ``(n_s,)``, ``(n_t,)`` potentials in the cost's units.
    converged, n_iters: the solver's.
    envelope: the value's gradient is the envelope gradient (a
      ``custom_vjp``, one GEMM backward); otherwise autodiff through
      ``plan`` and ``scaled.cost`` ("unroll").
  """
  dtype = scaled.cost.dtype
  value = scaled.unit * jnp.sum(plan * scaled.cost)
  if envelope:
    plan = jax.lax.stop_gradient(plan)
    value = value + global_sum(
        _envelope_gradient(scaled.a, scaled.t, plan, scaled.d,
                           problem.precision, problem.axis_name),
        problem.axis_name)
  n_s, n_t = plan.shape
  matched = (jnp.trace(plan) if n_s == n_t else
             jnp.asarray(jnp.nan, dtype))
  return NeuronTransport(
      value=value,
      plan=plan,
      matched_fraction=jax.lax.stop_gradient(matched),
      converged=converged,
      n_iters=n_iters,
      f=jax.lax.stop_gradient(f.astype(dtype) * scaled.unit),
      g=jax.lax.stop_gradient(g.astype(dtype) * scaled.unit),
      epsilon=scaled.epsilon,
      mass=jax.lax.stop_gradient(jnp.sum(plan)),
      comparison=problem.comparison,
  )


@functools.partial(jax.jit, static_argnames=("spatial", "normalize",
                                             "precision", "axis_name"))
def _scaled_cost(student, teacher, *, spatial, normalize, precision,
                 axis_name) -> jax.Array:
  """:meth:`NeuronTransport.cost_matrix`: ``C`` as the solve computed it."""
  scaled = scale_problem(student, teacher, NeuronProblem(
      spatial=spatial, normalize=normalize, precision=precision,
      axis_name=axis_name))
  return scaled.cost * scaled.unit


def make_sinkhorn(threshold: float, max_iterations: int,
                  inner_iterations: int, min_iterations: int, anderson: int,
                  recenter: bool) -> "sinkhorn.Sinkhorn":
  """ott-jax's ``Sinkhorn`` as :func:`solve_neuron_ot` runs it (log
  domain, no implicit differentiation); ``max_iterations`` is the whole
  budget (:func:`iteration_budget`), ``anderson`` 0 is off."""
  from ott.solvers.linear import acceleration, sinkhorn
  return sinkhorn.Sinkhorn(
      lse_mode=True,
      threshold=threshold,
      max_iterations=max_iterations,
      inner_iterations=inner_iterations,
      min_iterations=min_iterations,
      anderson=acceleration.AndersonAcceleration(memory=anderson)
      if anderson else None,
      # Unbalanced only: the translation-invariant Sinkhorn of Sejourne et
      # al. (2022) shifts (f, -g) by the optimal constant each iteration, the
      # mode that otherwise decays by tau^2 per iteration (tau = 0.999 on
      # 48 vs 32 ReLU neurons: ~4,100 iterations without, 30-40 with).
      recenter_potentials=recenter,
      # None: a loop that "unroll" can backpropagate through. "envelope"
      # feeds it constants, so no differentiation machinery runs at all.
      implicit_diff=None,
  )


# ---------------------------------------------------------------------------
# The solve
# ---------------------------------------------------------------------------


def solve_neuron_ot(
    student: jax.Array,
    teacher: jax.Array,
    *,
    problem: Optional[NeuronProblem] = None,
    sinkhorn: Optional[SinkhornOptions] = None,
    init: Optional[Tuple[jax.Array, jax.Array]] = None,
    **options: Any,
) -> NeuronTransport:
  """Entropic OT between a student layer's and a teacher layer's neurons.

  Args:
    student: ``(m, *positions, n_s)`` activations (any float dtype; computed in
      float32).
    teacher: ``(m, *positions', n_t)`` activations of the same batch. Treated as
      a constant (``stop_gradient``).
    problem: what is solved, a :class:`NeuronProblem` (None: its defaults).
    sinkhorn: how, a :class:`SinkhornOptions` (None: its defaults).
    init: ``(f, g)`` potentials of a previous solve, ``(n_s,)`` and ``(n_t,)``,
      to warm-start Sinkhorn (plans move slowly between training steps).
    **options: the convenient form: any field of :class:`NeuronProblem`
      (``spatial``, ``normalize``, ``epsilon``, ``relative_epsilon``,
      ``tau``, ``precision``, ``axis_name``) or of :class:`SinkhornOptions`
      (``threshold``, ``max_iterations``, ``inner_iterations``, ``anneal``,
      ``anderson``, ``grad``) by name; it overrides the field of
      ``problem`` / ``sinkhorn``. E.g. ``solve_neuron_ot(s, t,
      relative_epsilon=0.02, tau=0.9)``.

  Returns:
    A :class:`NeuronTransport` (replicated under ``axis_name``).

  Compilation: the options are checked here, eagerly; the solve itself is
  one ``jax.jit`` function with every option but ``epsilon``,
  ``relative_epsilon`` and ``threshold`` static. Called outside ``jit`` it
  compiles on the first call per (shapes, dtypes, options) and then runs in
  milliseconds; inside ``jit`` / ``grad`` / ``vmap`` / ``shard_map`` it is
  traced into the caller's program, once per trace of that program.

  Raises:
    ValueError: for activations that cannot be compared (see
      :func:`check_activations`), an unknown option value, a concrete
      epsilon or relative_epsilon that is not a positive finite number,
      iteration counts below 1, a non-positive threshold, ``init`` of the
      wrong shapes, a ``tau`` outside (0, 1] (or traced), or NaN / inf in
      concrete activations or ``init``. Under ``jit`` (traced values) nothing
      can be inspected: non-finite activations or an invalid epsilon give a
      NaN value with ``converged=False``; non-finite ``init`` potentials are
      restarted from by ott-jax's Sinkhorn (tested).
    TypeError: a keyword that is no option.
  """
  problem, sinkhorn = make_options(problem, sinkhorn, **options)
  student, teacher = check_activations(student, teacher, problem.spatial,
                                       axis_name=problem.axis_name)
  if init is not None:
    check_init(init, student.shape[-1], teacher.shape[-1])
    init = tuple(init)
  return _solve(student, teacher, init, problem.epsilon,
                problem.relative_epsilon, sinkhorn.threshold,
                spatial=problem.spatial, normalize=problem.normalize,
                max_iterations=iteration_budget(sinkhorn.max_iterations,
                                                problem.tau),
                inner_iterations=sinkhorn.inner_iterations,
                anneal=sinkhorn.anneal, grad=sinkhorn.grad,
                axis_name=problem.axis_name, precision=problem.precision,
                anderson=sinkhorn.anderson, tau=problem.tau)


# Compiled once per (shapes, dtypes, static options): an eager call runs one
# XLA program instead of dispatching ott-jax's Sinkhorn loop op by op (1.1-1.5
# s per call after the first, issue 26; now ~1-10 ms on 2 CPU cores). Inside
# an outer jit, grad, vmap or shard_map it is traced inline like any jitted
# function. epsilon, relative_epsilon and threshold may be traced values.
@functools.partial(jax.jit, static_argnames=(
    "spatial", "normalize", "max_iterations", "inner_iterations", "anneal",
    "grad", "axis_name", "precision", "anderson", "tau"))
def _solve(student, teacher, init, epsilon, relative_epsilon, threshold, *,
           spatial, normalize, max_iterations, inner_iterations, anneal, grad,
           axis_name, precision, anderson, tau) -> NeuronTransport:
  """:func:`solve_neuron_ot` on checked inputs; ``max_iterations`` is the
  whole budget (:func:`iteration_budget`)."""
  from ott.geometry import epsilon_scheduler, geometry
  from ott.problems.linear import linear_problem
  problem = NeuronProblem(spatial=spatial, normalize=normalize,
                          epsilon=epsilon, relative_epsilon=relative_epsilon,
                          tau=tau, precision=precision, axis_name=axis_name)
  n_s, n_t = student.shape[-1], teacher.shape[-1]
  if init is not None:
    init = tuple(replicated(jnp.asarray(p), axis_name) for p in init)

  scaled = scale_problem(student, teacher, problem)
  envelope = grad == "envelope"
  if envelope:
    scaled = scaled._replace(cost=jax.lax.stop_gradient(scaled.cost))
  unit = scaled.unit
  # Under jax_enable_x64, ott-jax builds some of its state in float64 (e.g.
  # Anderson's history), which a float32 solve cannot mix with: the small
  # n_s x n_t solve then runs in float64 and its results come back in the
  # activations' precision. Without x64 this is float32 throughout.
  dtype = scaled.cost.dtype
  solve_dtype = jnp.promote_types(dtype, jnp.result_type(float))
  cold = init is None
  if not cold:
    init = tuple((p / unit).astype(solve_dtype) for p in init)
  annealing = anneal and cold
  if inner_iterations is None:
    inner_iterations = 10 if cold else 2
  solve_eps = (scaled.epsilon / unit).astype(solve_dtype)
  schedule = (epsilon_scheduler.Epsilon(solve_eps, ANNEAL_INIT, ANNEAL_DECAY)
              if annealing else solve_eps)
  solver_cost = scaled.cost
  if tau < 1.0:
    # ott-jax's entropy is KL(P | 1 1^T); ours (and POT's) is KL(P | u v^T).
    # With uniform u, v they differ by <P, eps log(n_s n_t)>, a constant
    # shift of the cost: it moves no balanced plan but sets the unbalanced
    # plan's mass (without it the mass grows with the number of neurons).
    solver_cost = scaled.cost + (scaled.epsilon / unit) * math.log(n_s * n_t)
  geom = geometry.Geometry(cost_matrix=solver_cost.astype(solve_dtype),
                           epsilon=schedule)
  # Anderson's inner linear solve is a while loop: "unroll" could not
  # backpropagate through it.
  accelerate = anderson if envelope else 0
  out = make_sinkhorn(threshold, max_iterations, inner_iterations,
                      ANNEAL_ITERATIONS if annealing else 0, accelerate,
                      recenter=tau < 1.0)(
                          linear_problem.LinearProblem(geom, tau_a=tau,
                                                       tau_b=tau),
                          init=init)
  return transport_from_solution(scaled, out.matrix.astype(dtype), out.f,
                                 out.g, out.converged, out.n_iters, problem,
                                 envelope=envelope)
