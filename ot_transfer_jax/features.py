"""Representation capture: logits and chosen activations from one forward pass.

A layer is named by its module path, "/"-joined: ``"stage3"``,
``"stage3/block1"``, ``"head"``; its activation is the output of that module's
``__call__``. Capture uses Flax's ``capture_intermediates`` with a filter that
keeps only the requested paths, so memory grows with what is asked for, not
with the depth of the network::

  layers = ("stage2", "stage3")
  logits, feats, state = apply_with_features(
      model, variables, x, layers, train=True)
  feats["stage3"]       # [N, 8, 8, 64] for resnet20 on 32 x 32 inputs
  state["batch_stats"]  # the updated running statistics
"""

import difflib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_CALL = "__call__"


def _capture_all(module: nn.Module, method_name: str) -> bool:
  return method_name == _CALL


def _layer_paths(
    intermediates: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> list[str]:
  """Module paths of every ``__call__`` output in an ``intermediates`` tree."""
  paths = []
  for key, value in intermediates.items():
    if key == _CALL:
      if prefix:  # The root's output is the logits; it has no path.
        paths.append("/".join(prefix))
    else:
      paths.extend(_layer_paths(value, prefix + (key,)))
  return paths


def available_layers(
    model: nn.Module, variables: Mapping[str, Any], sample_input: Any
) -> list[str]:
  """Every capturable module path, sorted (a parent before its children).

  Runs an abstract forward pass (``jax.eval_shape``): no FLOPs, no memory.

  Args:
    model: the Flax module.
    variables: ``{"params", ["batch_stats"]}``, of arrays or ShapeDtypeStructs.
    sample_input: an input batch, or its ``jax.ShapeDtypeStruct``, e.g.
      [1, 32, 32, 3].
  Returns:
    E.g. ``["bn1", "conv1", "head", "stage1", "stage1/block0",
    "stage1/block0/bn1", ...]``.
  """

  def forward(variables, x):
    _, state = model.apply(
        variables,
        x,
        train=False,
        capture_intermediates=_capture_all,
        mutable=["intermediates"],
    )
    return state["intermediates"]

  return sorted(_layer_paths(jax.eval_shape(forward, variables, sample_input)))


def _unknown_layers_error(
    unknown: Sequence[str], available: Sequence[str]
) -> ValueError:
  lines = []
  for path in unknown:
    close = difflib.get_close_matches(path, available, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    lines.append(f"unknown layer {path!r}{hint}")
  available = ", ".join(available)
  return ValueError(f"{'; '.join(lines)}. Available layers: {available}")


def validate_layers(
    model: nn.Module,
    variables: Mapping[str, Any],
    sample_input: Any,
    layers: Sequence[str],
) -> None:
  """Raises ``ValueError`` unless every path in ``layers`` exists.

  The message names each unknown path with its nearest match, then lists every
  available path. Arguments as in :func:`available_layers`.
  """
  available = available_layers(model, variables, sample_input)
  unknown = [path for path in layers if path not in available]
  if unknown:
    raise _unknown_layers_error(unknown, available)


def apply_with_features(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jnp.ndarray,
    layers: Sequence[str],
    *,
    train: bool,
    rngs: Mapping[str, jax.Array] | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray], dict[str, Any]]:
  """One forward pass: logits, the activations at ``layers``, the new state.

  Works under ``jax.jit`` with ``layers`` (a tuple) and ``train`` static. An
  unknown layer raises the ``ValueError`` of :func:`validate_layers`, at trace
  time.

  Args:
    model: the Flax module, applied as ``model.apply(variables, x, train=)``.
    variables: ``{"params", ["batch_stats"]}``.
    x: an input batch, e.g. [N, H, W, C].
    layers: module paths to capture, e.g. ``("stage2", "stage3/block1")``.
    train: BatchNorm normalises with, and updates from, batch statistics;
      dropout is active.
    rngs: PRNG keys of the forward pass, e.g. ``{"dropout": key}``.

  Returns:
    ``(logits, features, new_model_state)``:

    * ``logits``: [N, num_classes];
    * ``features``: ``{path: activation}``, e.g. ``{"stage3": [N, H', W',
      C']}``; for a module called more than once, its last output;
    * ``new_model_state``: with ``train``, the updated collections,
      ``{"batch_stats": ...}`` (``{}`` for a model without BatchNorm);
      without ``train``, always ``{}``: nothing changes.
  """
  wanted = frozenset(tuple(path.split("/")) for path in layers)

  def capture_filter(module: nn.Module, method_name: str) -> bool:
    return method_name == _CALL and module.path in wanted

  mutable = ["intermediates", "batch_stats"] if train else ["intermediates"]
  logits, state = model.apply(
      variables,
      x,
      train=train,
      rngs=rngs,
      capture_intermediates=capture_filter,
      mutable=mutable,
  )
  state = dict(state)
  intermediates = state.pop("intermediates", {})

  features, unknown = {}, []
  for path in layers:
    node = intermediates
    for name in path.split("/"):
      node = node.get(name, {}) if isinstance(node, Mapping) else {}
    if _CALL in node:
      features[path] = node[_CALL][-1]
    else:
      unknown.append(path)
  if unknown:
    raise _unknown_layers_error(unknown, available_layers(model, variables, x))
  return logits, features, state
