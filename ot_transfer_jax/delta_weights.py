"""DELTA's channel weights (Li et al., ICLR 2019): behaviour-based attention.

DELTA regularises the student's feature maps towards the teacher's,
channel-weighted (:func:`ot_transfer_jax.losses.delta`). The weight of channel
``j`` of a layer measures how much the *teacher* needs that channel on the
*target* task:

1. a linear head for the target classes is fitted on the teacher's frozen
   penultimate features of the target training images (the teacher's own head
   predicts other classes);
2. with that head, channel ``j``'s output is set to zero and the increase of
   the cross-entropy over the target images is recorded:
   ``d_j = L(without j) - L``;
3. per layer, ``d`` is standardised (``z = (d - mean d) / std d``) and
   ``w = softmax(z / T)`` with temperature ``T = 5``, so ``sum_j w_j = 1``.

This follows the authors' released code (``channel_eval.py`` and ``train.py``
of github.com/lixingjian/DELTA), which removes a channel by zeroing its conv
filter; here the channel is removed at the layer's *output* (the feature map
the regulariser compares), through ``flax.linen.intercept_methods``, so any
layer path of any model works. Uniform weights ``1/n`` turn DELTA into
Omega_I (``feature_matching``).

Everything here is a pure function of (model, variables, images, labels).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

DEFAULT_TEMPERATURE = 5.0  # DELTA's released code: softmax(z / 5).


def delta_channel_weights(loss_increase: jax.Array,
                          temperature: float = DEFAULT_TEMPERATURE) -> jax.Array:
  """``(n,)`` loss increases -> ``(n,)`` channel weights summing to 1.

  ``softmax(z / temperature)`` with ``z`` the increases standardised over the
  layer (population std). A channel whose removal hurts more gets more weight;
  equal increases (std 0) give uniform weights ``1 / n``.
  """
  d = jnp.asarray(loss_increase, jnp.float32)
  if d.ndim != 1 or d.shape[0] == 0:
    raise ValueError(f"loss_increase must be a non-empty (n,) vector, got shape {d.shape}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  std = jnp.std(d)
  z = jnp.where(std > 0, (d - jnp.mean(d)) / jnp.where(std > 0, std, 1.0), 0.0)
  return jax.nn.softmax(z / temperature)


def _path(layer: str) -> tuple[str, ...]:
  return tuple(layer.split("/"))


def apply_with_channel_mask(model: nn.Module, variables: Mapping, images: jax.Array,
                            layer: str, mask: jax.Array) -> jax.Array:
  """Evaluation-mode logits with ``layer``'s output multiplied by ``mask``.

  Args:
    images: ``(m, H, W, C)``.
    layer: module path, e.g. ``"stage2"`` or ``"stage3/block0"``.
    mask: ``(n,)``, broadcast on the output's last (channel) axis.

  Returns:
    ``(m, num_classes)`` float32 logits.
  """
  path = _path(layer)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path == path:
      out = out * mask.astype(out.dtype)
    return out

  with nn.intercept_methods(interceptor):
    return model.apply(variables, images, train=False).astype(jnp.float32)


def head_inputs(model: nn.Module, variables: Mapping, images: jax.Array,
                head: str = "head") -> jax.Array:
  """``(m, D)``: what the ``head`` module receives (the penultimate features)."""
  captured = []
  path = _path(head)

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path == path:
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  if not captured:
    raise ValueError(f"{type(model).__name__} has no module {head!r} to fit.")
  return captured[0].astype(jnp.float32)


def fit_linear_head(features: jax.Array, labels: jax.Array, num_classes: int, *,
                    steps: int = 300, learning_rate: float = 0.01,
                    weight_decay: float = 1e-4) -> dict:
  """A softmax-regression head on frozen features (DELTA's step 1).

  Full-batch Adam from zero weights: deterministic.

  Args:
    features: ``(N, D)``; labels: int ``(N,)`` in ``[0, num_classes)``.

  Returns:
    ``{"kernel": (D, num_classes), "bias": (num_classes,)}``, ``nn.Dense``'s layout.
  """
  features = jnp.asarray(features, jnp.float32)
  params = {"kernel": jnp.zeros((features.shape[-1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adam(learning_rate)

  def loss(p):
    logits = features @ p["kernel"] + p["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + 0.5 * weight_decay * jnp.sum(jnp.square(p["kernel"]))

  def step(carry, _):
    p, state = carry
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    return (optax.apply_updates(p, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


def channel_removal_increase(model: nn.Module, variables: Mapping, images: jax.Array,
                             labels: jax.Array, layer: str) -> jax.Array:
  """``(n,)``: mean cross-entropy increase when each channel of ``layer`` is zeroed.

  One evaluation-mode forward pass per channel (``jax.lax.map``: memory of one).
  """
  n = jax.eval_shape(
      lambda v, x: _layer_output(model, v, x, layer), variables, images).shape[-1]

  def loss(mask):
    logits = apply_with_channel_mask(model, variables, images, layer, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  base = loss(jnp.ones((n,), jnp.float32))
  return jax.lax.map(loss, 1.0 - jnp.eye(n, dtype=jnp.float32)) - base


def _layer_output(model, variables, images, layer):
  captured = []
  path = _path(layer)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and context.module.path == path:
      captured.append(out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  if not captured:
    raise ValueError(f"{type(model).__name__} has no layer {layer!r}.")
  return captured[0]


def channel_weights(model: nn.Module, variables: Mapping, images: jax.Array,
                    labels: jax.Array, layers: Sequence[str], num_classes: int, *,
                    temperature: float = DEFAULT_TEMPERATURE,
                    head_steps: int = 300) -> dict:
  """DELTA's weights ``{layer: (n_layer,)}`` for the teacher on the target task.

  Args:
    model: the network with the *target* head (``num_classes`` outputs), e.g.
      the transfer student.
    variables: the teacher's variables; its ``head`` (of any number of
      classes) is replaced by one fitted on ``images``/``labels`` (step 1).
    images: ``(m, H, W, C)`` normalised target training images.
    labels: int ``(m,)`` target labels.
    layers: the regularised layers.
  """
  # The teacher's own head may have another number of classes: swap in one of
  # the target's shape before the first forward pass.
  width = variables["params"]["head"]["kernel"].shape[0]
  placeholder = {"kernel": jnp.zeros((width, num_classes)), "bias": jnp.zeros((num_classes,))}
  features = head_inputs(model, {**variables, "params": {**variables["params"],
                                                         "head": placeholder}}, images)
  head = fit_linear_head(features, labels, num_classes, steps=head_steps)
  fitted = {**variables, "params": {**variables["params"], "head": head}}
  return {layer: delta_channel_weights(
      channel_removal_increase(model, fitted, images, labels, layer), temperature)
          for layer in layers}
