"""Input checks of the regularisers: a ``ValueError`` that says the fix.

Everything here runs eagerly, before any solve is traced: on concrete values
it inspects shapes, dtypes and values; on traced ones (under ``jax.jit``) it
checks what it can (shapes, dtypes) and lets the rest through, where an
invalid value poisons the result with NaN instead (see
:func:`ot_transfer_jax.ot.solve_neuron_ot`). The public checks are
re-exported by :mod:`ot_transfer_jax.ot`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Literal, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ot_transfer_jax import collectives

# The options' vocabularies (documented in ot.py, which re-exports them).
Spatial = Literal["flatten", "pool"]
Normalize = Literal["none", "l2", "standardize"]
GradMode = Literal["envelope", "unroll"]
Precision = Literal["highest", "high", "default", "bfloat16"]

SPATIAL_MODES = ("flatten", "pool")
NORMALIZE_MODES = ("none", "l2", "standardize")
GRAD_MODES = ("envelope", "unroll")
#: Precision of the cost matrix's GEMM: "highest" (full float32, the
#: default), "high" / "default" (the backend's faster passes: bf16x3 / TF32 /
#: bf16 on accelerators, float32 on CPU), "bfloat16" (operands cast to
#: bfloat16 everywhere, float32 accumulation).
PRECISIONS = ("highest", "high", "default", "bfloat16")


def check_choice(name: str, value: str, choices: Tuple[str, ...]) -> None:
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name}={value!r} is not one of {choices}.")


def is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def real_scalar(name: str, value: Any) -> Optional[float]:
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
  return None if is_traced(value) else float(value)


def check_positive(name: str, value: Any, hint: str) -> None:
  """ValueError unless a concrete ``value`` is a positive finite number."""
  v = real_scalar(name, value)
  if v is not None and not (v > 0 and math.isfinite(v)):
    raise ValueError(
        f"{name} must be a positive finite number, got {value!r}. {hint}")


def check_tau(tau: Any) -> float:
  """``tau`` as a float; ValueError unless a concrete number in (0, 1].

  (ott-jax branches on ``tau == 1`` in Python, so it cannot be traced.)
  """
  hint = ("tau=1 is balanced transport; a smaller tau lets more mass go "
          "unmatched, e.g. tau=0.9.")
  if is_traced(tau):
    raise ValueError(
        "tau must be a concrete Python float, got a traced value: the solver "
        f"is built for a fixed tau. Pass it as a constant. {hint}")
  v = real_scalar("tau", tau)
  if not 0.0 < v <= 1.0:
    raise ValueError(f"tau must lie in (0, 1], got {tau!r}. {hint}")
  return v


def check_count(name: str, value: Any) -> int:
  """A concrete integer >= 1 (an iteration count sets the loop's bounds)."""
  if isinstance(value, (bool, np.bool_)) or is_traced(value):
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


def as_array(x: Any, who: str) -> jax.Array:
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


def check_finite(x: Any, what: str, fix: str) -> None:
  """ValueError if a concrete array holds NaN or inf; traced ones (under
  ``jit``) cannot be inspected: they give a NaN result instead."""
  if is_traced(x):
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


def check_dtype(x: Any, who: str) -> None:
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
  check_choice("spatial", spatial, SPATIAL_MODES)
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
                      *, axis_name: collectives.AxisName = None
                      ) -> Tuple[jax.Array, jax.Array]:
  """Raises ``ValueError`` unless two layers' activations can be compared.

  Checks :func:`check_activation_shapes`, a real floating-point dtype, finite
  values (concrete arrays only: under ``jit`` non-finite activations give a
  NaN result with ``converged=False``) and, inside ``shard_map``,
  :func:`~ot_transfer_jax.collectives.check_axis_name`.

  Returns:
    ``(student, teacher)`` as arrays: array-likes (nested lists) converted,
    arrays unchanged.
  """
  student, teacher = as_array(student, "student"), as_array(teacher,
                                                            "teacher")
  check_dtype(student, "student")
  check_dtype(teacher, "teacher")
  check_activation_shapes(jnp.shape(student), jnp.shape(teacher), spatial)
  collectives.check_axis_name(axis_name, student=student, teacher=teacher)
  fix = ("Check what produced them (a diverged network, log(0), a bfloat16 "
         "overflow); Omega_P of NaN is undefined. (Under jax.jit values "
         "cannot be checked: the result is NaN with converged=False.)")
  check_finite(student, "The student activations", fix)
  check_finite(teacher, "The teacher activations", fix)
  return student, teacher


def check_init(init: Any, n_s: int, n_t: int) -> None:
  """ValueError unless ``init`` is a pair of finite potentials ``(f (n_s,),
  g (n_t,))``."""
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
    check_finite(potential, f"The init potentials {name}",
                 "They come from a solve that diverged or saw non-finite "
                 "activations: pass init=None for a cold start.")
