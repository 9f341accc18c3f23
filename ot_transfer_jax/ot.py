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
axis to pass (:func:`check_axis_name`). Under ``pmap`` and
``shard_map(..., check_vma=False)``, where values carry no such type, every
function computes the per-device value: that of the device's own shard.

Precision: activations are computed in float32 (bfloat16 promoted), float64
stays float64. Under ``jax_enable_x64`` the small ``n_s x n_t`` Sinkhorn solve
of float32 activations runs in float64 (ott-jax builds part of its state in
the default float type) and its results come back in float32.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# ott-jax is imported by the functions that solve, not here: it imports
# jaxopt and scipy.optimize, which took 8 of the 21 s `import ot_transfer_jax`
# took on a loaded machine; the descriptors, costs and baselines need none.

Spatial = Literal["flatten", "pool"]
Normalize = Literal["none", "l2", "standardize"]
GradMode = Literal["envelope", "unroll"]
Precision = Literal["highest", "high", "default", "bfloat16"]
AxisName = Optional[Union[str, Sequence[str]]]

SPATIAL_MODES = ("flatten", "pool")
NORMALIZE_MODES = ("none", "l2", "standardize")
GRAD_MODES = ("envelope", "unroll")
#: Precision of the cost matrix's GEMM: "highest" (full float32, the
#: default), "high" / "default" (the backend's faster passes: bf16x3 / TF32 /
#: bf16 on accelerators, float32 on CPU), "bfloat16" (operands cast to
#: bfloat16 everywhere, float32 accumulation).
PRECISIONS = ("highest", "high", "default", "bfloat16")
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

# Floors that keep degenerate inputs (dead neurons, constant or tiny
# activations) finite: they only matter when a quantity is ~0.
_TINY = 1e-30


@struct.dataclass
class NeuronTransport:
  """The solution of one neuron-to-neuron OT problem (a pytree).

  Attributes:
    value: scalar, ``Omega_P = <P*, C>`` (the transport cost of the entropic
      plan, not the entropic objective). Its gradient depends on ``grad``.
    plan: ``(n_s, n_t)``, the entropic plan ``P*``; sums to 1 (``mass``
      when ``tau < 1``).
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
    mass: scalar, ``sum(P*)``: 1 for balanced transport (up to
      ``threshold``), the share of mass transported when ``tau < 1``.
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
  mass: jax.Array

  @property
  def potentials(self) -> Tuple[jax.Array, jax.Array]:
    """``(f, g)``, ready to be passed as ``init=`` to the next solve."""
    return self.f, self.g


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


def _check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def _real_scalar(name: str, value: Any) -> Optional[float]:
  """``value`` as a float, or None when traced; ValueError if not a number.

  Python, NumPy and JAX scalars are treated alike (a bool is not a number).
  """
  if isinstance(value, (str, bytes)):
    dtype, shape = None, None
  elif hasattr(value, "dtype"):
    dtype, shape = value.dtype, tuple(value.shape)
  else:
    array = np.asarray(value)
    dtype, shape = array.dtype, array.shape
  real = dtype is not None and (jnp.issubdtype(dtype, jnp.floating) or (
      jnp.issubdtype(dtype, jnp.integer) and dtype != bool))
  if not real or shape != ():
    raise ValueError(
        f"{name} must be a real number (a scalar), got {value!r} of type "
        f"{type(value).__name__}. Pass e.g. {name}=0.01.")
  return None if _is_traced(value) else float(value)


def _check_positive(name: str, value: Any, hint: str) -> None:
  """ValueError unless a concrete ``value`` is a positive finite number."""
  v = _real_scalar(name, value)
  if v is not None and not (v > 0 and math.isfinite(v)):
    raise ValueError(
        f"{name} must be a positive finite number, got {value!r}. {hint}")


def check_tau(tau: Any) -> float:
  """``tau`` as a float; ValueError unless a concrete number in (0, 1].

  (ott-jax branches on ``tau == 1`` in Python, so it cannot be traced.)
  """
  hint = ("tau=1 is balanced transport; a smaller tau lets more mass go "
          "unmatched, e.g. tau=0.9.")
  if _is_traced(tau):
    raise ValueError(
        "tau must be a concrete Python float, got a traced value: the solver "
        f"is built for a fixed tau. Pass it as a constant. {hint}")
  v = _real_scalar("tau", tau)
  if not 0.0 < v <= 1.0:
    raise ValueError(f"tau must lie in (0, 1], got {tau!r}. {hint}")
  return v


def _check_count(name: str, value: Any) -> int:
  """A concrete integer >= 1 (an iteration count sets the loop's bounds)."""
  if isinstance(value, (bool, np.bool_)) or _is_traced(value):
    value_ok = None
  else:
    try:
      value_ok = operator.index(value)
    except TypeError:
      value_ok = None
  if value_ok is None or value_ok < 1:
    raise ValueError(
        f"{name} must be an integer >= 1, got {value!r}. Iteration counts "
        "are static (they size the solver's loop): pass a Python int.")
  return value_ok


def _as_array(x: Any, who: str) -> jax.Array:
  """Arrays (JAX, NumPy, tracers) as they are; other array-likes (nested
  lists, tuples) converted, or a ValueError saying what to pass."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  try:
    array = np.asarray(x)
  except (ValueError, TypeError):  # Ragged nested lists.
    array = None
  if array is None or array.dtype.kind not in "biufc":
    raise ValueError(
        f"The {who} activations, a {type(x).__name__}, are not a numeric "
        "array (ragged rows, or not numbers). Pass a jax or numpy array "
        "(batch, [height, width,] neurons), e.g. jnp.asarray(rows) with rows "
        "of equal length.")
  return array


def _check_finite(x: Any, what: str, fix: str) -> None:
  """ValueError if a concrete array holds NaN or inf; traced ones (under
  ``jit``) cannot be inspected: they give a NaN result instead."""
  if _is_traced(x):
    return
  if not isinstance(x, np.ndarray):
    # A device array is reduced where it lives (copied only when it fails),
    # eagerly even when it is a constant inside a function being traced.
    with jax.ensure_compile_time_eval():
      if bool(jnp.all(jnp.isfinite(x))):
        return
  finite = np.isfinite(np.asarray(x))
  if finite.all():
    return
  first = tuple(int(i) for i in np.argwhere(~finite)[0])
  raise ValueError(
      f"{what} contain {int((~finite).sum())} non-finite values (NaN or "
      f"inf) out of {finite.size}, the first at index {first}. {fix}")


def _check_dtype(x: Any, who: str) -> None:
  dtype = np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"The {who} activations have dtype {dtype}; the regulariser needs "
        "real floating-point activations. Cast them first, e.g. "
        "x.astype(jnp.float32) (or take the real part / magnitude of complex "
        "values).")


def check_activation_shapes(
    student_shape: Tuple[int, ...],
    teacher_shape: Tuple[int, ...],
    spatial: str = "flatten",
) -> None:
  """Raises ``ValueError`` unless two activation shapes can be compared.

  Activations are ``(batch, *positions, neurons)``: ``(m, n)`` for a dense
  layer, ``(m, h, w, n)`` for a convolution, ``(m, tokens, n)`` for a
  transformer. Student and teacher must share the batch; ``spatial="flatten"``
  also needs equal positions (same rank and same ``h, w``, or ``h * w`` tokens
  against an ``h x w`` grid: a ViT's patches in row-major order),
  ``spatial="pool"`` averages positions away so any may differ.
  Under ``axis_name=`` the shapes are each device's shard.
  """
  _check_choice("spatial", spatial, SPATIAL_MODES)
  given = f"student {tuple(student_shape)}, teacher {tuple(teacher_shape)}"
  for who, shape in (("student", student_shape), ("teacher", teacher_shape)):
    if len(shape) < 2:
      raise ValueError(
          f"Activations must be (batch, [positions...,] neurons); the {who} "
          f"has shape {tuple(shape)} (given: {given}). Add a batch axis, e.g. "
          "x[None] for a single example.")
    if 0 in tuple(shape):
      raise ValueError(
          f"The {who} activations have an empty axis (size 0): {given}. "
          "Every axis (batch, positions, neurons) needs at least one entry; "
          "check the batch split and the captured layer.")
  if student_shape[0] != teacher_shape[0]:
    raise ValueError(
        f"Student and teacher must see the same mini-batch, but the batch "
        f"sizes differ: {given}. Feed both networks the same examples.")
  s_pos, t_pos = tuple(student_shape[1:-1]), tuple(teacher_shape[1:-1])
  # A token sequence against a grid: tokens are the grid's rows, row-major.
  tokens_vs_grid = ((len(s_pos) == 1) != (len(t_pos) == 1) and
                    math.prod(s_pos) == math.prod(t_pos))
  if spatial == "flatten" and s_pos != t_pos and not tokens_vs_grid:
    raise ValueError(
        f"spatial='flatten' compares neurons position by position, so the "
        f"positions must match: student positions {s_pos} vs teacher {t_pos} "
        f"({given}). Pick layers with the same resolution and rank (or h * w "
        "tokens against an h x w grid), or use spatial='pool' to average "
        "positions away.")


def check_activations(student: Any, teacher: Any, spatial: str = "flatten",
                      *, axis_name: AxisName = None
                      ) -> Tuple[jax.Array, jax.Array]:
  """Raises ``ValueError`` unless two layers' activations can be compared.

  Checks :func:`check_activation_shapes`, a real floating-point dtype, finite
  values (concrete arrays only: under ``jit`` non-finite activations give a
  NaN result with ``converged=False``) and, inside ``shard_map``,
  :func:`check_axis_name`.

  Returns:
    ``(student, teacher)`` as arrays: array-likes (nested lists) converted,
    arrays unchanged.
  """
  student, teacher = _as_array(student, "student"), _as_array(teacher,
                                                              "teacher")
  _check_dtype(student, "student")
  _check_dtype(teacher, "teacher")
  check_activation_shapes(jnp.shape(student), jnp.shape(teacher), spatial)
  check_axis_name(axis_name, student=student, teacher=teacher)
  fix = ("Check what produced them (a diverged network, log(0), a bfloat16 "
         "overflow); Omega_P of NaN is undefined. (Under jax.jit values "
         "cannot be checked: the result is NaN with converged=False.)")
  _check_finite(student, "The student activations", fix)
  _check_finite(teacher, "The teacher activations", fix)
  return student, teacher


# ---------------------------------------------------------------------------
# Sums over a batch-sharded device axis
# ---------------------------------------------------------------------------


def _varying_axes(x: jax.Array) -> frozenset:
  """Mesh axes along which ``x`` varies inside ``shard_map`` (else empty)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(vma)


def _axes(axis_name: AxisName) -> Tuple[str, ...]:
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def global_sum(x: Any, axis_name: AxisName = None) -> Any:
  """``lax.psum`` of per-device partial sums over ``axis_name``.

  Args:
    x: an array or pytree of arrays, this device's partial sums.
    axis_name: the batch-sharded axis of ``jax.pmap`` / ``jax.shard_map``, a
      tuple of axes, or None (single device: returns ``x``).

  Returns:
    The same on every device; differentiated by JAX's own rules for
    ``psum`` (see the module docstring).
  """
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def axis_size(axis_name: AxisName) -> int:
  """Number of devices along ``axis_name`` (1 when None); static."""
  if axis_name is None:
    return 1
  return math.prod(jax.lax.axis_size(a) for a in _axes(axis_name))


def _replicated(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """``x`` made invariant across ``axis_name`` inside ``shard_map``.

  ott-jax's Sinkhorn needs every input mesh-invariant (its ``lax.cond``
  branches must have equal types); values that already are cost nothing.
  """
  if axis_name is None or not (set(_axes(axis_name)) & _varying_axes(x)):
    return x
  return jax.lax.pmean(x, axis_name)


def check_axis_name(axis_name: AxisName, **arrays: Any) -> None:
  """ValueError when, inside ``jax.shard_map``, an input varies across a mesh
  axis that ``axis_name`` does not name.

  Such an input is a shard of a batch split over that axis: without its name
  the result would be the OT (or mean) of one device's shard, and ott-jax's
  Sinkhorn would fail deep inside with a ``cond`` TypeError. Under
  ``jax.pmap`` (which does not type values by device) and
  ``shard_map(..., check_vma=False)`` nothing can be detected: without
  ``axis_name`` every function computes the per-device value, i.e. on the
  device's shard of the batch.

  Args:
    axis_name: as passed to the function, None included.
    **arrays: the inputs by name (``student=...``, ``teacher=...``).
  """
  named = set() if axis_name is None else set(_axes(axis_name))
  for who, x in arrays.items():
    missing = sorted(_varying_axes(x) - named)
    if not missing:
      continue
    axes = ", ".join(repr(a) for a in missing)
    wanted = sorted(named | set(missing))
    fix = repr(wanted[0]) if len(wanted) == 1 else repr(tuple(wanted))
    raise ValueError(
        f"The {who} activations vary across the shard_map mesh axis {axes} "
        f"(the batch is split over it), but axis_name={axis_name!r}. Pass "
        f"axis_name={fix} to get the value of the global batch on every "
        "device (docs/usage.md, 'Several devices'); for the per-device value "
        "of each shard instead, run under shard_map(..., check_vma=False).")


# ---------------------------------------------------------------------------
# Descriptors -> cost -> solve
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
  _check_choice("spatial", spatial, SPATIAL_MODES)
  _check_choice("normalize", normalize, NORMALIZE_MODES)
  activations = _as_array(activations, "layer")
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
    rms = jnp.sqrt(jnp.maximum(column_mean(x * x), _TINY))
    x = x / rms
  elif normalize == "standardize":
    x = x - column_mean(x)
    std = jnp.sqrt(jnp.maximum(column_mean(x * x), _TINY))
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
  student_desc = _as_array(student_desc, "student")
  teacher_desc = _as_array(teacher_desc, "teacher")
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
  _check_choice("precision", precision, PRECISIONS)
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
    eps = jnp.asarray(relative_epsilon, dtype) * jnp.maximum(scale, _TINY)
  # Concrete values were checked up front; a traced invalid one poisons the
  # solve (NaN value, converged=False) instead of returning a plausible value.
  return jnp.where((eps > 0) & jnp.isfinite(eps), eps, jnp.nan)


def _solver(threshold: float, max_iterations: int, inner_iterations: int,
            min_iterations: int, anderson: int,
            recenter: bool) -> "sinkhorn.Sinkhorn":
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


def _check_init(init: Any, n_s: int, n_t: int) -> None:
  expected = f"f ({n_s},) for the student's {n_s} neurons and g ({n_t},) " \
      f"for the teacher's {n_t}"
  if not (isinstance(init, (tuple, list)) and len(init) == 2):
    raise ValueError(
        f"init must be a pair (f, g) of potentials, {expected}; got "
        f"{type(init).__name__}. Pass a previous result's .potentials.")
  shapes = tuple(tuple(jnp.shape(p)) for p in init)
  if shapes != ((n_s,), (n_t,)):
    raise ValueError(
        f"init potentials have shapes f {shapes[0]} and g {shapes[1]}, but "
        f"this problem needs {expected}. Pass the .potentials of a solve of "
        "the same layer pair (student first), or init=None for a cold start.")
  for name, potential in zip("fg", init):
    _check_finite(potential, f"The init potentials {name}",
                  "They come from a solve that diverged or saw non-finite "
                  "activations: pass init=None for a cold start.")


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
    axis_name: AxisName = None,
    precision: Precision = "highest",
    anderson: int = DEFAULT_ANDERSON_MEMORY,
    tau: float = 1.0,
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
    max_iterations: iteration budget of balanced transport (a bound, not a
      target); an unbalanced solve gets ``ceil(5 tau / (1 - tau))`` more
      (6,995 in all at ``tau=0.999``), see :func:`iteration_budget`. Whether
      the solve converged within it is ``converged`` (and ``n_iters``).
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
    axis_name: inside ``jax.pmap`` / ``jax.shard_map`` with the batch sharded
      over this axis (or tuple of axes), solve the OT problem of the *global*
      batch: each device's partial cost terms are summed with one ``psum``
      and every device solves the same ``n_s x n_t`` problem. The value is
      replicated; the gradient is the per-shard gradient of the global
      Omega_P (see the module docstring for what to ``psum`` afterwards).
    precision: of the cost matrix's GEMM (and the envelope gradient's):
      ``"highest"`` (default, full float32), ``"high"``, ``"default"`` (the
      backend's fastest: TF32 / bf16 passes on GPUs and TPUs), ``"bfloat16"``
      (operands cast to bfloat16, float32 accumulation).
    anderson: memory of the Anderson acceleration (``grad="envelope"``
      only): from iteration ``anderson + 1`` on, each iteration extrapolates
      from the last ``anderson`` potentials. 3 cuts a cold solve's iterations
      2-4 fold at the same accuracy; warm starts that converge within
      ``anderson`` iterations are unaffected. 0 turns it off.
    tau: in (0, 1]; 1 (default) is balanced transport, every neuron's mass
      matched. Below 1 the marginals are KL penalties of weight ``rho = eps
      tau / (1 - tau)`` (ott-jax's ``tau_a = tau_b = tau``): neurons with no
      good counterpart keep part of their mass unmatched (see the module
      docstring for the value and gradient). ``rho`` scales with epsilon:
      at the default ``relative_epsilon=0.01``, ``tau=0.99`` prices unmatched
      mass at about the mean cost, while ``tau=0.9`` (``rho`` = 0.09 x mean
      cost) already leaves most of the mass unmatched.

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
      :func:`check_activations`), an unknown option, a concrete epsilon or
      relative_epsilon that is not a positive finite number, iteration counts
      below 1, a non-positive threshold, ``init`` of the wrong shapes, a
      ``tau`` outside (0, 1] (or traced), or NaN / inf in concrete activations
      or ``init``. Under ``jit`` (traced values) nothing can be inspected:
      non-finite activations or an invalid epsilon give a NaN value with
      ``converged=False``; non-finite ``init`` potentials are restarted from
      by ott-jax's Sinkhorn (tested).
  """
  student, teacher = check_activations(student, teacher, spatial,
                                       axis_name=axis_name)
  _check_choice("grad", grad, GRAD_MODES)
  _check_choice("precision", precision, PRECISIONS)
  hint = (f"The default is relative_epsilon={DEFAULT_RELATIVE_EPSILON} "
          "(times mean cost).")
  if epsilon is not None:
    _check_positive("epsilon", epsilon, hint)
  _check_positive("relative_epsilon", relative_epsilon, hint)
  _check_positive("threshold", threshold,
                  "It bounds the L1 marginal error, e.g. threshold=1e-3.")
  max_iterations = _check_count("max_iterations", max_iterations)
  if inner_iterations is not None:
    inner_iterations = _check_count("inner_iterations", inner_iterations)
  if isinstance(anderson, (bool, np.bool_)) or not isinstance(
      anderson, (int, np.integer)) or anderson < 0:
    raise ValueError(f"anderson must be an integer >= 0 (0: off), got "
                     f"{anderson!r}. The default is {DEFAULT_ANDERSON_MEMORY}.")
  if not isinstance(anneal, (bool, np.bool_)):
    raise ValueError(f"anneal must be True or False, got {anneal!r}.")
  tau = check_tau(tau)
  if init is not None:
    _check_init(init, student.shape[-1], teacher.shape[-1])
    init = tuple(init)
  return _solve(student, teacher, init, epsilon, relative_epsilon, threshold,
                spatial=spatial, normalize=normalize,
                max_iterations=iteration_budget(max_iterations, tau),
                inner_iterations=inner_iterations, anneal=bool(anneal),
                grad=grad, axis_name=tuple(axis_name) if isinstance(
                    axis_name, list) else axis_name,
                precision=precision, anderson=int(anderson), tau=tau)


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
  n_s, n_t = student.shape[-1], teacher.shape[-1]
  if init is not None:
    init = tuple(_replicated(jnp.asarray(p), axis_name) for p in init)

  describe = functools.partial(neuron_descriptors, spatial=spatial,
                               normalize=normalize, axis_name=axis_name)
  a = describe(student)
  t = jax.lax.stop_gradient(describe(teacher))
  sq_s, sq_t, cross, mean_cost, d = _cost_terms(a, t, axis_name, precision)
  eps = _epsilon(mean_cost, epsilon, relative_epsilon, cross.dtype)
  if epsilon is not None:
    eps = _replicated(eps, axis_name)
  # Sinkhorn sees the cost in units of its mean, so that its numbers (and
  # Anderson's extrapolation, which is not scale-free) do not depend on the
  # activations' scale; the plan is the same, the potentials are scaled back.
  unit = jax.lax.stop_gradient(jnp.maximum(mean_cost, _TINY))
  scaled_cost = _assemble_cost(sq_s, sq_t, cross, d * unit)

  envelope = grad == "envelope"
  if envelope:
    scaled_cost = jax.lax.stop_gradient(scaled_cost)
  # Under jax_enable_x64, ott-jax builds some of its state in float64 (e.g.
  # Anderson's history), which a float32 solve cannot mix with: the small
  # n_s x n_t solve then runs in float64 and its results come back in the
  # activations' precision. Without x64 this is float32 throughout.
  dtype = scaled_cost.dtype
  solve_dtype = jnp.promote_types(dtype, jnp.result_type(float))
  cold = init is None
  if not cold:
    init = tuple((p / unit).astype(solve_dtype) for p in init)
  annealing = anneal and cold
  if inner_iterations is None:
    inner_iterations = 10 if cold else 2
  solve_eps = (eps / unit).astype(solve_dtype)
  schedule = (epsilon_scheduler.Epsilon(solve_eps, ANNEAL_INIT, ANNEAL_DECAY)
              if annealing else solve_eps)
  solver_cost = scaled_cost
  if tau < 1.0:
    # ott-jax's entropy is KL(P | 1 1^T); ours (and POT's) is KL(P | u v^T).
    # With uniform u, v they differ by <P, eps log(n_s n_t)>, a constant
    # shift of the cost: it moves no balanced plan but sets the unbalanced
    # plan's mass (without it the mass grows with the number of neurons).
    solver_cost = scaled_cost + (eps / unit) * math.log(n_s * n_t)
  geom = geometry.Geometry(cost_matrix=solver_cost.astype(solve_dtype),
                           epsilon=schedule)
  # Anderson's inner linear solve is a while loop: "unroll" could not
  # backpropagate through it.
  accelerate = anderson if envelope else 0
  out = _solver(threshold, max_iterations, inner_iterations,
                ANNEAL_ITERATIONS if annealing else 0, accelerate,
                recenter=tau < 1.0)(
                    linear_problem.LinearProblem(geom, tau_a=tau, tau_b=tau),
                    init=init)
  # The plan is built once: value, gradient and matched fraction reuse it.
  plan = out.matrix.astype(dtype)
  value = unit * jnp.sum(plan * scaled_cost)
  if envelope:
    plan = jax.lax.stop_gradient(plan)
    value = value + global_sum(
        _envelope_gradient(a, t, plan, d, precision, axis_name), axis_name)

  matched = (jnp.trace(plan) if n_s == n_t else
             jnp.asarray(jnp.nan, scaled_cost.dtype))
  return NeuronTransport(
      value=value,
      plan=plan,
      # Materialised only if used (a training step uses value and f, g).
      cost_matrix=scaled_cost * unit,
      matched_fraction=jax.lax.stop_gradient(matched),
      converged=out.converged,
      n_iters=out.n_iters,
      f=jax.lax.stop_gradient(out.f.astype(dtype) * unit),
      g=jax.lax.stop_gradient(out.g.astype(dtype) * unit),
      epsilon=eps,
      mass=jax.lax.stop_gradient(jnp.sum(plan)),
  )
