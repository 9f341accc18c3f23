"""The OT regulariser and the baselines it is compared with, as pure functions.

Activations are ``(batch, [height, width,] neurons)``; the teacher's are held
constant (``stop_gradient``). Every function returns a float32 scalar (and
``ot_regularizer(..., return_transport=True)`` the solve with it, to check
``converged``) and works under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` for
float32 or bfloat16 inputs.
The feature losses take ``axis_name=``: inside ``jax.pmap`` / ``jax.shard_map``
over a batch-sharded axis they return the global-batch value on every device,
with the per-shard gradient convention of :mod:`ot_transfer_jax.ot`.

============================  ================================================
``ot_regularizer``            Omega_P = <P*, C>, neurons matched by entropic OT
``feature_matching``          Omega_I, identity coupling (plain feature matching)
``delta``                     DELTA: channel-weighted feature matching
``attention_transfer``        AT: distance of normalised spatial attention maps
``fitnets_hint``              FitNets: L2 between regressed student and teacher
``kd_loss``                   KD: temperature-softened KL on logits
``l2`` / ``l2_sp``            weight decay / decay towards the starting point
============================  ================================================
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from ot_transfer_jax import ot

PyTree = Any


def ot_regularizer(student: jax.Array, teacher: jax.Array, *,
                   return_transport: bool = False, **options: Any) -> Any:
  """Omega_P between two layers: ``solve_neuron_ot(student, teacher, ...).value``.

  Args:
    student: ``(m, *positions, n_s)`` activations.
    teacher: ``(m, *positions', n_t)`` activations of the same batch.
    return_transport: also return the solve's
      :class:`~ot_transfer_jax.ot.NeuronTransport` (``converged``,
      ``n_iters``, ``plan``, ``mass``, ...): ``(value, transport)``, the
      shape ``jax.value_and_grad(..., has_aux=True)`` expects.
    **options: any keyword of :func:`ot_transfer_jax.ot.solve_neuron_ot`
      (``epsilon``, ``relative_epsilon``, ``spatial``, ``normalize``,
      ``threshold``, ``max_iterations``, ``grad``, ``init``, ``axis_name``,
      ``precision``, ``tau``: below 1, unbalanced transport).

  Returns:
    Scalar float32 (with ``return_transport``: ``(value, transport)``). With
    the default ``grad="envelope"`` its gradient treats the plan as a
    constant. A solve that ran out of iterations still returns a value:
    ``transport.converged`` says whether it met ``threshold``.
  """
  if not isinstance(return_transport, bool):
    raise ValueError(f"return_transport must be True or False, got "
                     f"{return_transport!r}.")
  transport = ot.solve_neuron_ot(student, teacher, **options)
  return (transport.value, transport) if return_transport else transport.value


def _global_mean(x: jax.Array, axis_name: ot.AxisName) -> jax.Array:
  """Mean of ``x`` over the global batch when its first axis is sharded."""
  return ot.global_sum(jnp.sum(x), axis_name) / (
      x.size * ot.axis_size(axis_name))


def _matched_descriptors(student, teacher, spatial, normalize, what,
                         axis_name):
  """(D, n) descriptors of two layers that must have equal widths."""
  student, teacher = ot.check_activations(student, teacher, spatial,
                                          axis_name=axis_name)
  if student.shape[-1] != teacher.shape[-1]:
    raise ValueError(
        f"{what} pairs neuron j of the student with neuron j of the teacher, "
        f"so the widths must be equal, but the student has "
        f"{student.shape[-1]} neurons and the teacher {teacher.shape[-1]} "
        f"(shapes {tuple(student.shape)} and {tuple(teacher.shape)}). Use "
        "ot_regularizer, which matches layers of any widths, or project the "
        "student first (fitnets_hint).")
  describe = functools.partial(ot.neuron_descriptors, spatial=spatial,
                               normalize=normalize, axis_name=axis_name)
  return describe(student), jax.lax.stop_gradient(describe(teacher))


def feature_matching(student: jax.Array, teacher: jax.Array, *,
                     spatial: ot.Spatial = "flatten",
                     normalize: ot.Normalize = "none",
                     axis_name: ot.AxisName = None) -> jax.Array:
  """Omega_I: the identity coupling ``P = I / n``.

  ``mean_j ||a_j - t_j||^2 / D``, i.e. the mean squared difference of the two
  activation tensors. Same descriptors and cost as :func:`ot_regularizer`, so
  ``Omega_P <= Omega_I`` up to the entropic bias.

  Args:
    student, teacher: ``(m, *positions, n)``, equal widths ``n``.
    spatial, normalize, axis_name: as in
      :func:`ot_transfer_jax.ot.neuron_descriptors`.

  Raises:
    ValueError: when the widths (or, for ``"flatten"``, positions) differ.
  """
  a, t = _matched_descriptors(student, teacher, spatial, normalize,
                              "feature_matching (Omega_I)", axis_name)
  return _global_mean(jnp.square(a - t), axis_name)


def delta(student: jax.Array, teacher: jax.Array,
          channel_weights: jax.Array, *, spatial: ot.Spatial = "flatten",
          normalize: ot.Normalize = "none",
          axis_name: ot.AxisName = None) -> jax.Array:
  """DELTA (Li et al. 2019): channel-weighted feature-map distance.

  ``sum_j w_j ||a_j - t_j||^2 / D``. With ``w_j = 1 / n`` this is
  :func:`feature_matching`. DELTA's weights come from the teacher (how much
  the task loss grows when channel ``j`` is removed, normalised to sum to 1);
  they are an input here and held constant.

  Args:
    student, teacher: ``(m, *positions, n)``, equal widths.
    channel_weights: ``(n,)`` non-negative weights (the same on every
      device under ``axis_name``).
    spatial, normalize, axis_name: as in :func:`feature_matching`.
  """
  a, t = _matched_descriptors(student, teacher, spatial, normalize, "delta",
                              axis_name)
  n = a.shape[-1]
  if jnp.shape(channel_weights) != (n,):
    raise ValueError(f"channel_weights must have shape ({n},) (one per "
                     f"neuron), got {tuple(jnp.shape(channel_weights))}.")
  w = jax.lax.stop_gradient(jnp.asarray(channel_weights, jnp.float32))
  # sum_j w_j mean_D(.) = n * mean_{D, j}(w_j .), one global mean.
  return n * _global_mean(w * jnp.square(a - t), axis_name)


def _attention_map(x: jax.Array, p: float) -> jax.Array:
  """``(m, h, w, c) -> (m, h*w)``: mean over channels of ``|a|^p``, unit norm."""
  q = jnp.mean(jnp.abs(x.astype(jnp.float32)) ** p, axis=-1)
  q = q.reshape(q.shape[0], -1)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(q * q, axis=-1, keepdims=True), 1e-24))
  return q / norm


def attention_transfer(student: jax.Array, teacher: jax.Array, *,
                       p: float = 2.0,
                       axis_name: ot.AxisName = None) -> jax.Array:
  """AT (Zagoruyko & Komodakis 2017): distance of spatial attention maps.

  The attention map of a ``(m, h, w, c)`` layer is ``mean_c |a_c|^p``
  flattened to ``(m, h*w)`` and L2-normalised per example; the loss is the
  mean squared difference of the two maps. Channel counts may differ.

  Args:
    student: ``(m, h, w, c_s)``.
    teacher: ``(m, h, w, c_t)``; same ``m, h, w``.
    p: exponent of the attention map (2 in the paper).
    axis_name: the batch is sharded over this device axis (maps are per
      example, so only the final mean is global).
  """
  if jnp.ndim(student) != 4 or jnp.ndim(teacher) != 4:
    raise ValueError(
        "attention_transfer needs convolutional activations (m, h, w, c); got "
        f"student {tuple(jnp.shape(student))}, teacher "
        f"{tuple(jnp.shape(teacher))}.")
  student, teacher = ot.check_activations(student, teacher, "flatten",
                                          axis_name=axis_name)
  q_t = jax.lax.stop_gradient(_attention_map(teacher, p))
  return _global_mean(jnp.square(_attention_map(student, p) - q_t), axis_name)


def fitnets_hint(student_projected: jax.Array, teacher: jax.Array, *,
                 axis_name: ot.AxisName = None) -> jax.Array:
  """FitNets (Romero et al. 2015): L2 between regressed student and teacher.

  Args:
    student_projected: the student's features passed through a learned
      regressor (e.g. a 1x1 convolution) to the teacher's shape.
    teacher: teacher features, same shape.
    axis_name: the batch is sharded over this device axis.

  Returns:
    ``mean((student_projected - teacher)^2)`` (over the global batch).
  """
  if jnp.shape(student_projected) != jnp.shape(teacher):
    raise ValueError(
        f"fitnets_hint needs the regressed student features to have the "
        f"teacher's shape: got {tuple(jnp.shape(student_projected))} vs "
        f"{tuple(jnp.shape(teacher))}. Make the regressor output "
        f"{jnp.shape(teacher)[-1]} channels at the teacher's resolution.")
  student_projected, teacher = ot.check_activations(
      student_projected, teacher, "flatten", axis_name=axis_name)
  t = jax.lax.stop_gradient(teacher.astype(jnp.float32))
  return _global_mean(
      jnp.square(student_projected.astype(jnp.float32) - t), axis_name)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float = 4.0) -> jax.Array:
  """KD (Hinton et al. 2015): ``T^2 KL(softmax(t/T) || softmax(s/T))``.

  Args:
    student_logits: ``(m, k)``.
    teacher_logits: ``(m, k)``.
    temperature: ``T``; the ``T^2`` factor keeps gradient scales comparable
      across temperatures.

  Returns:
    The KL divergence averaged over the batch.
  """
  student_logits = jnp.asarray(student_logits)
  teacher_logits = jnp.asarray(teacher_logits)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f"kd_loss needs logits of the same shape, got student "
        f"{tuple(student_logits.shape)} and teacher "
        f"{tuple(teacher_logits.shape)}: KD needs the same label space.")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  s = student_logits.astype(jnp.float32) / temperature
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
  kl = optax.kl_divergence(jax.nn.log_softmax(s), jax.nn.softmax(t))
  return temperature**2 * jnp.mean(kl)


def l2(params: PyTree) -> jax.Array:
  """``||theta||^2 / 2`` over every leaf (weight decay is ``beta * l2``)."""
  leaves = jax.tree_util.tree_leaves(params)
  return 0.5 * sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves)


def l2_sp(params: PyTree, reference_params: PyTree, *, alpha: float = 0.1,
          head_params: Optional[PyTree] = None,
          beta: float = 0.01) -> jax.Array:
  """L2-SP (Li, Grandvalet, Davoine 2018): decay towards the starting point.

  ``alpha/2 ||theta - theta^0||^2`` on the shared backbone plus
  ``beta/2 ||theta_head||^2`` on the new head.

  Args:
    params: the student's backbone parameters.
    reference_params: the pre-trained backbone ``theta^0`` (same structure);
      held constant.
    alpha: weight of the pull towards ``theta^0``.
    head_params: parameters of the new head (not in ``reference_params``).
    beta: weight decay of the head.
  """
  ref = jax.lax.stop_gradient(reference_params)
  try:
    diff = jax.tree_util.tree_map(jnp.subtract, params, ref)
  except ValueError as e:
    raise ValueError(
        "l2_sp needs params and reference_params with the same structure "
        "(pass the backbone alone, and the new head as head_params): "
        f"{e}") from None
  penalty = alpha * l2(diff)
  if head_params is not None:
    penalty = penalty + beta * l2(head_params)
  return penalty
