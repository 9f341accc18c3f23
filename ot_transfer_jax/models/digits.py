"""Small networks for the 8 x 8 x 1 scikit-learn digits; they train in seconds.

``width`` scales every layer (``max(1, round(base * width))`` units), so a
narrower student, e.g. ``width=0.5``, has other neuron counts than its teacher:

  DigitsCNN  stage1  conv3x3(16w)-BN-ReLU             [N, 8, 8, 16w]
             stage2  conv3x3(32w)-BN-ReLU-avgpool2x2  [N, 4, 4, 32w]
             (global average pooling)
             stage3  dense(64w)-ReLU                  [N, 64w]
             head                                     [N, num_classes]
  DigitsMLP  stage1  dense(128w)-ReLU of the pixels   [N, 128w]
             stage2  dense(64w)-ReLU                  [N, 64w]
             head                                     [N, num_classes]

Stages are single layers (``stage1/conv``, ``stage1/bn``, ``stage3/dense``),
not residual blocks.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ot_transfer_jax.models.layers import batch_norm, classifier_head, conv


def _scaled(base: int, width: float) -> int:
  return max(1, round(base * width))


class ConvStage(nn.Module):
  """conv3x3-BN-ReLU, then 2x2 average pooling if ``downsample``.

  [N, H, W, C] -> [N, H, W, features], or [N, H / 2, W / 2, features].
  """

  features: int
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = conv(self.features, 3, 1, self.dtype, "conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn")(x))
    if self.downsample:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return x


class DenseStage(nn.Module):
  """Dense-ReLU: [N, D] -> [N, features]."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # Same signature as the other stages.
    return nn.relu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


class DigitsCNN(nn.Module):
  """[N, 8, 8, 1] -> [N, num_classes] logits."""

  num_classes: int = 10
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    w, dtype = self.width, self.dtype
    x = x.astype(dtype)
    x = ConvStage(_scaled(16, w), dtype=dtype, name="stage1")(x, train)
    x = ConvStage(_scaled(32, w), True, dtype=dtype, name="stage2")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = DenseStage(_scaled(64, w), dtype=dtype, name="stage3")(x, train)
    return classifier_head(x, self.num_classes, dtype)


class DigitsMLP(nn.Module):
  """[N, 8, 8, 1] (any trailing shape; flattened) -> [N, num_classes] logits."""

  num_classes: int = 10
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    w, dtype = self.width, self.dtype
    x = x.reshape(x.shape[0], -1).astype(dtype)
    x = DenseStage(_scaled(128, w), dtype=dtype, name="stage1")(x, train)
    x = DenseStage(_scaled(64, w), dtype=dtype, name="stage2")(x, train)
    return classifier_head(x, self.num_classes, dtype)
