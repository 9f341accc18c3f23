"""ImageNet ResNet-18/34/50/101 with torchvision's architecture (v1.5).

A 7x7/2 stem ``conv1`` + ``bn1`` + ReLU, a 3x3/2 max-pool, ``stage1..stage4``
(torchvision's ``layer1..layer4``) of basic or bottleneck blocks, global
average pooling and ``head`` (torchvision's ``fc``). Bottlenecks stride on
their 3x3 conv (v1.5). Module names follow torchvision's state-dict keys, so
:mod:`experiments.pretrained` (the experiment suite) loads its weights one-to-one.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ot_transfer_jax.models.layers import (
    Stage,
    batch_norm,
    classifier_head,
    conv,
    global_avg_pool,
)


def _shortcut(
    x: jnp.ndarray, out: int, strides: int, train: bool, dtype: Any
) -> jnp.ndarray:
  """Identity, or torchvision's ``downsample`` (1x1 conv + BN) on a change."""
  if strides == 1 and x.shape[-1] == out:
    return x
  x = conv(out, 1, strides, dtype, "downsample_conv")(x)
  return batch_norm(train, dtype, "downsample_bn")(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs: [N, H, W, C] -> [N, H / strides, W / strides, features]."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    y = conv(self.features, 3, self.strides, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    shortcut = _shortcut(x, self.features, self.strides, train, self.dtype)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided), 1x1 expanding 4x.

  [N, H, W, C] -> [N, H / strides, W / strides, 4 * features].
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    out = 4 * self.features
    y = conv(self.features, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.features, 3, self.strides, self.dtype, "conv2")(y)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(out, 1, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype))


class ResNet(nn.Module):
  """[N, H, W, 3] (224 x 224 nominal) -> [N, num_classes] logits.

  Stage outputs for 224 x 224 inputs, with e = 1 (basic) or 4 (bottleneck):
  stage1 [N, 56, 56, 64e], stage2 [N, 28, 28, 128e], stage3 [N, 14, 14, 256e],
  stage4 [N, 7, 7, 512e].

  Attributes:
    num_classes: size of ``head``.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    bottleneck: bottleneck (ResNet-50/101) or basic (ResNet-18/34) blocks.
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  bottleneck: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    x = conv(64, 7, 2, self.dtype, "conv1")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    # Flax pads max-pooling with -inf, like PyTorch's MaxPool2d(3, 2, 1).
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = Bottleneck if self.bottleneck else BasicBlock
    block = functools.partial(block_cls, dtype=self.dtype)
    for i, num_blocks in enumerate(self.stage_sizes):
      strides = 1 if i == 0 else 2
      stage = Stage(block, 64 * 2**i, num_blocks, strides, name=f"stage{i + 1}")
      x = stage(x, train)
    return classifier_head(global_avg_pool(x), self.num_classes, self.dtype)
