"""CIFAR ResNets (He et al. 2016, Sec. 4.2) as defined in RepDistiller.

A 3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks (the last two
stages stride 2), global average pooling and ``head``:

  resnet20/32/56/110: stem 16 channels, stages 16 / 32 / 64.
  resnet8x4/32x4:     stem 32 channels, stages 64 / 128 / 256.

Like RepDistiller (Tian et al. 2020), a shortcut that changes shape is a 1x1
conv + BN (option B), not the paper's zero-padded identity: resnet20 gains 1%
parameters, and the ``x4`` teachers of the distillation literature are exactly
reproduced. Stage outputs are post-ReLU.
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
# The same basic block as torchvision's ResNet-18/34 (RepDistiller's too).
from ot_transfer_jax.models.resnet import BasicBlock


class CifarResNet(nn.Module):
  """[N, 32, 32, 3] (any H, W divisible by 4) -> [N, num_classes] logits.

  Attributes:
    num_classes: size of ``head``.
    depth: 6n + 2, e.g. 8, 20, 32, 56, 110.
    stem_width: channels of the 3x3 stem ``conv1``.
    widths: channels of ``stage1``, ``stage2``, ``stage3``.
    dtype: compute dtype; parameters stay float32.
  """

  num_classes: int
  depth: int = 20
  stem_width: int = 16
  widths: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    if (self.depth - 2) % 6:
      raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {self.depth}.")
    num_blocks = (self.depth - 2) // 6
    x = x.astype(self.dtype)
    x = conv(self.stem_width, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    block = functools.partial(BasicBlock, dtype=self.dtype)
    for i, width in enumerate(self.widths):
      strides = 1 if i == 0 else 2
      stage = Stage(block, width, num_blocks, strides, name=f"stage{i + 1}")
      x = stage(x, train)
    return classifier_head(global_avg_pool(x), self.num_classes, self.dtype)
