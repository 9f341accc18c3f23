"""A small CNN family for 28 x 28 images (Fashion-MNIST, MNIST) that trains on a CPU.

``width`` scales every stage (``max(1, round(base * width))`` channels), so a
teacher and a student of the same family can have other neuron counts::

  SmallCNN  stage1  conv3x3(16w)-BN-ReLU                 [N, 28, 28, 16w]
            stage2  maxpool2x2, conv3x3(32w)-BN-ReLU     [N, 14, 14, 32w]
            stage3  maxpool2x2, conv3x3(64w)-BN-ReLU     [N,  7,  7, 64w]
            (global average pooling)
            head                                         [N, num_classes]

The stage outputs have the resolutions of a CIFAR ResNet's on the same input
(``resnet8`` on 28 x 28: 28, 14, 7), so Omega_P with ``spatial="flatten"``,
attention transfer and FitNets compare the two families layer by layer. The
pooling comes first in a stage so that each stage's output is its own conv's
(post-ReLU) feature map at full resolution.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ot_transfer_jax.models.layers import batch_norm, classifier_head, conv, global_avg_pool

BASE_WIDTHS = (16, 32, 64)


class PoolConvStage(nn.Module):
  """(2x2 max pooling if ``downsample``), conv3x3-BN-ReLU.

  [N, H, W, C] -> [N, H, W, features], or [N, H / 2, W / 2, features].
  """

  features: int
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if self.downsample:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = conv(self.features, 3, 1, self.dtype, "conv")(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


class SmallCNN(nn.Module):
  """[N, H, W, C] (H, W divisible by 4; 28 x 28 x 1 intended) -> [N, num_classes] logits.

  Attributes:
    num_classes: size of ``head``.
    width: multiplier of the stage widths 16 / 32 / 64.
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int = 10
  width: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x.astype(self.dtype)
    for i, base in enumerate(BASE_WIDTHS):
      features = max(1, round(base * self.width))
      x = PoolConvStage(features, downsample=i > 0, dtype=self.dtype,
                        name=f"stage{i + 1}")(x, train)
    return classifier_head(global_avg_pool(x), self.num_classes, self.dtype)
