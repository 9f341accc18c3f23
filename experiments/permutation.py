"""Function-preserving neuron permutations of a sequential CNN (the permutation study).

Permuting the output channels of a stage -- its conv kernel's output axis,
its BatchNorm's scale, bias and running statistics -- and the input axis of
the next stage's conv (or of the head's kernel after global pooling) by the
same permutation gives the same network under other neuron indices: the same
logits for every input. A student started from such weights is the teacher
up to neuron order, the case where Omega_P (blind to order) and Omega_I
(neuron ``i`` to neuron ``i``) part ways.

Supported: networks whose top-level modules are stages ``stage1 .. stageN``
applied one after another, each with one conv (4-D ``kernel``, optional
``bias``) and per-channel vectors (BatchNorm), then a ``head`` (``small_cnn``,
not ``digits_cnn``, whose last stage is dense). Anything else is refused with
a ``ValueError``.
"""

from __future__ import annotations

import re
from typing import Mapping

import flax
import jax
import numpy as np

HEAD = "head"
_STAGE = re.compile(r"stage(\d+)$")


def _stages(variables: Mapping) -> list[str]:
  names = list(variables["params"])
  stages = sorted((n for n in names if _STAGE.match(n)),
                  key=lambda n: int(_STAGE.match(n).group(1)))
  others = set(names) - set(stages) - {HEAD}
  if not stages or others:
    raise ValueError(
        "Neuron permutation supports sequential CNNs (top-level modules "
        f"stage1..stageN and head); these variables have {sorted(names)}. "
        "Use small_cnn, or set init_permuted=False.")
  return stages


def _widths(variables: Mapping) -> dict[str, int]:
  out = {}
  for stage in _stages(variables):
    flat = flax.traverse_util.flatten_dict(variables["params"][stage])
    kernels = [v for k, v in flat.items() if k[-1] == "kernel"]
    if len(kernels) != 1 or np.ndim(kernels[0]) != 4:
      raise ValueError(
          f"Neuron permutation: {stage} must hold one conv kernel "
          f"(kh, kw, in, out); it holds {[k for k in flat]}.")
    out[stage] = int(np.shape(kernels[0])[-1])
  return out


def draw(rng: jax.Array, variables: Mapping) -> dict[str, np.ndarray]:
  """A random permutation of every stage's channels: ``{stage: (C,) ints}``."""
  out = {}
  for i, (stage, width) in enumerate(_widths(variables).items()):
    out[stage] = np.asarray(
        jax.random.permutation(jax.random.fold_in(rng, i), width))
  return out


def permute_neurons(variables: Mapping,
                    perms: Mapping[str, np.ndarray]) -> dict:
  """``variables`` with stage ``s``'s channel ``perms[s][c]`` moved to ``c``.

  Args:
    variables: ``{"params": ..., "batch_stats": ...}`` of a sequential CNN.
    perms: ``{stage: (C,) permutation}`` for every stage (:func:`draw`).

  Returns:
    The same network with other neuron indices: identical logits, and stage
    ``s``'s activations ``a'[..., c] = a[..., perms[s][c]]``.
  """
  widths = _widths(variables)
  if set(perms) != set(widths):
    raise ValueError(f"perms has stages {sorted(perms)}, the network "
                     f"{sorted(widths)}.")
  for stage, width in widths.items():
    if sorted(np.asarray(perms[stage]).tolist()) != list(range(width)):
      raise ValueError(f"perms[{stage!r}] is not a permutation of its "
                       f"{width} channels.")
  order = list(widths)
  incoming = {HEAD: perms[order[-1]],
              **{s: perms[p] for p, s in zip(order, order[1:])}}
  out = {}
  for col, tree in variables.items():
    new = {}
    for module, sub in tree.items():
      flat = flax.traverse_util.flatten_dict(sub)
      for path, value in flat.items():
        value = np.asarray(value)
        if module in perms:  # The stage's own channels: the last axis.
          value = np.take(value, perms[module], axis=-1)
        if module in incoming and path[-1] == "kernel":  # Its inputs.
          value = np.take(value, incoming[module], axis=-2)
        flat[path] = value
      new[module] = flax.traverse_util.unflatten_dict(flat)
    out[col] = new
  return out
