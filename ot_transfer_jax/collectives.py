"""Sums over a batch-sharded device axis, and the check that one is named.

Inside ``jax.pmap`` or ``jax.shard_map`` with the batch split over a mesh
axis, the regularisers take ``axis_name`` and compute the quantity of the
*global* batch: each device's partial sums are reduced with one ``psum``
(:func:`global_sum`). The gradient convention (JAX's own rules for ``psum``)
is in :mod:`ot_transfer_jax.ot`'s module docstring.

Inside ``shard_map``, activations that vary across a mesh axis the caller
did not name are refused (:func:`check_axis_name`): without the name, the
result would silently be one shard's.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple, Union

import jax

#: A ``pmap`` / ``shard_map`` axis name, a tuple (or list) of them, or None
#: (a single device).
AxisName = Optional[Union[str, Sequence[str]]]


def varying_axes(x: jax.Array) -> frozenset:
  """Mesh axes along which ``x`` varies inside ``shard_map`` (else empty)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(vma)


def axes(axis_name: AxisName) -> Tuple[str, ...]:
  """``axis_name`` as a tuple of axis names."""
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
    ``psum`` (see :mod:`ot_transfer_jax.ot`).
  """
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def axis_size(axis_name: AxisName) -> int:
  """Number of devices along ``axis_name`` (1 when None); static."""
  if axis_name is None:
    return 1
  return math.prod(jax.lax.axis_size(a) for a in axes(axis_name))


def replicated(x: jax.Array, axis_name: AxisName) -> jax.Array:
  """``x`` made invariant across ``axis_name`` inside ``shard_map``.

  ott-jax's Sinkhorn needs every input mesh-invariant (its ``lax.cond``
  branches must have equal types); values that already are cost nothing.
  """
  if axis_name is None or not (set(axes(axis_name)) & varying_axes(x)):
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
  named = set() if axis_name is None else set(axes(axis_name))
  for who, x in arrays.items():
    missing = sorted(varying_axes(x) - named)
    if not missing:
      continue
    listed = ", ".join(repr(a) for a in missing)
    wanted = sorted(named | set(missing))
    fix = repr(wanted[0]) if len(wanted) == 1 else repr(tuple(wanted))
    raise ValueError(
        f"The {who} activations vary across the shard_map mesh axis {listed} "
        f"(the batch is split over it), but axis_name={axis_name!r}. Pass "
        f"axis_name={fix} to get the value of the global batch on every "
        "device (docs/usage.md, 'Several devices'); for the per-device value "
        "of each shard instead, run under shard_map(..., check_vma=False).")
