"""Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016), CIFAR variant.

A 3x3 stem of 16 channels, three stages of ``(d - 4) / 6`` pre-activation
blocks of widths 16k, 32k, 64k (the last two stages stride 2), a final BN-ReLU
(``final_bn``), global average pooling and ``head``. As in the authors' code,
a shortcut that changes shape is a 1x1 conv of the pre-activated input.
Blocks are pre-activation, so stage outputs are *pre*-BN-ReLU sums.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ot_transfer_jax.models.layers import (
    Stage,
    batch_norm,
    classifier_head,
    conv,
    global_avg_pool,
)


class PreActBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus shortcut.

  [N, H, W, C] -> [N, H / strides, W / strides, features].
  """

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    act = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    y = conv(self.features, 3, self.strides, self.dtype, "conv1")(act)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, self.dtype, "shortcut_conv")(act)
    return x + y


class WideResNet(nn.Module):
  """[N, 32, 32, 3] (any H, W divisible by 4) -> [N, num_classes] logits.

  Attributes:
    num_classes: size of ``head``.
    depth: 6n + 4, e.g. 16, 28, 40.
    widen_factor: k; the stages have 16k, 32k, 64k channels.
    dropout_rate: dropout between the two convs of a block; when > 0, training
      needs a ``"dropout"`` rng.
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int
  depth: int = 16
  widen_factor: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}.")
    num_blocks = (self.depth - 4) // 6
    x = x.astype(self.dtype)
    x = conv(16, 3, 1, self.dtype, "conv1")(x)
    block = functools.partial(
        PreActBlock, dropout_rate=self.dropout_rate, dtype=self.dtype
    )
    for i, width in enumerate((16, 32, 64)):
      strides = 1 if i == 0 else 2
      width *= self.widen_factor
      stage = Stage(block, width, num_blocks, strides, name=f"stage{i + 1}")
      x = stage(x, train)
    x = nn.relu(batch_norm(train, self.dtype, "final_bn")(x))
    return classifier_head(global_avg_pool(x), self.num_classes, self.dtype)
