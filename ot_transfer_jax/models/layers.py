"""Building blocks shared by the model definitions.

Every network here is a stem, named stages ``stage1``, ``stage2``, ... and a
final ``nn.Dense`` named ``head``. A residual stage is a :class:`Stage` of
blocks named ``block0``, ``block1``, ..., so representations can be picked by
path (``"stage3"``, ``"stage3/block1"``) with :mod:`ot_transfer_jax.features`.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]

# PyTorch's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`, the init of
# torchvision's ResNets and of the CIFAR ResNets/WRNs of the distillation
# literature. Flax kernels are HWIO, so fan_out = H * W * O as in PyTorch.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  """BatchNorm with PyTorch's eps (1e-5) and momentum (0.1, Flax's 0.9).

  Statistics live in the ``batch_stats`` collection; they are used as is in
  evaluation and updated from the batch when ``train``.
  """
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      name=name,
  )


def conv(
    features: int, kernel: int, strides: int, dtype: Any, name: str
) -> nn.Conv:
  """Bias-free square convolution with PyTorch's padding ``kernel // 2``.

  Explicit symmetric padding, not "SAME": on even inputs a strided "SAME"
  convolution pads (0, 1) where PyTorch pads (1, 1), which would shift every
  pixel relative to pretrained PyTorch weights.
  """
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(strides, strides),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      kernel_init=conv_init,
      dtype=dtype,
      name=name,
  )


def classifier_head(
    x: jnp.ndarray, num_classes: int, dtype: Any
) -> jnp.ndarray:
  """The final ``nn.Dense``, named ``head``: [N, D] -> [N, num_classes].

  Logits are returned in float32 whatever the compute dtype, for a stable
  softmax.
  """
  logits = nn.Dense(num_classes, dtype=dtype, name="head")(x)
  return logits.astype(jnp.float32)


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))


class Stage(nn.Module):
  """Residual blocks named ``block0``, ``block1``, ...; the first one strides.

  Attributes:
    block: block constructor, called as ``block(features=, strides=, name=)``,
      then applied as ``(x, train)``.
    features: width argument of every block.
    num_blocks: number of blocks.
    strides: stride of the first block.
  """

  block: ModuleDef
  features: int
  num_blocks: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """[N, H, W, C] -> [N, H / strides, W / strides, C_out]."""
    for i in range(self.num_blocks):
      strides = self.strides if i == 0 else 1
      block = self.block(
          features=self.features, strides=strides, name=f"block{i}"
      )
      x = block(x, train)
    return x
