"""Model zoo: NHWC images -> logits, with named stages and a ``head``.

Every model has the fields ``num_classes`` and ``dtype``, stages ``stage1``,
``stage2``, ... (residual ones made of ``block0``, ``block1``, ...) and a final
``nn.Dense`` named ``head``; the ViT (:mod:`ot_transfer_jax.models.vit`) has
transformer blocks ``block0``, ``block1``, ... of ``(N, tokens, width)``
instead of stages::

  model = create_model("resnet20", num_classes=10)
  variables = model.init(rng, jnp.zeros((1, 32, 32, 3)))  # params, batch_stats
  logits = model.apply(variables, x)  # evaluation: running BN statistics
  logits, state = model.apply(variables, x, train=True, mutable=["batch_stats"])

Pretrained torchvision weights: :mod:`experiments.pretrained` (the experiment suite).
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax

from ot_transfer_jax.models.cifar_resnet import CifarResNet
from ot_transfer_jax.models.digits import DigitsCNN, DigitsMLP
from ot_transfer_jax.models.resnet import ResNet
from ot_transfer_jax.models.small_cnn import SmallCNN
from ot_transfer_jax.models.vit import ViT
from ot_transfer_jax.models.wrn import WideResNet

_partial = functools.partial
_X4 = dict(stem_width=32, widths=(64, 128, 256))

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    # CIFAR, 32 x 32 inputs (any side divisible by 4: 28 x 28 too).
    "resnet8": _partial(CifarResNet, depth=8),
    "resnet20": _partial(CifarResNet, depth=20),
    "resnet32": _partial(CifarResNet, depth=32),
    "resnet56": _partial(CifarResNet, depth=56),
    "resnet110": _partial(CifarResNet, depth=110),
    "resnet8x4": _partial(CifarResNet, depth=8, **_X4),
    "resnet32x4": _partial(CifarResNet, depth=32, **_X4),
    "wrn_16_2": _partial(WideResNet, depth=16, widen_factor=2),
    "wrn_40_1": _partial(WideResNet, depth=40, widen_factor=1),
    "wrn_40_2": _partial(WideResNet, depth=40, widen_factor=2),
    # ImageNet, 224 x 224 inputs; torchvision's layout.
    "resnet18": _partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False),
    "resnet34": _partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False),
    "resnet50": _partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True),
    "resnet101": _partial(ResNet, stage_sizes=(3, 4, 23, 3), bottleneck=True),
    # Fashion-MNIST / MNIST, 28 x 28 x 1 inputs (`width=` multiplier).
    "small_cnn": SmallCNN,
    # Pre-LN ViT, 4 x 4 patches: 7 x 7 tokens on 28 x 28 (`width=`, `depth=`).
    "vit": ViT,
    # The same for 8 x 8 digits: 2 x 2 patches, 4 x 4 tokens.
    "digits_vit": functools.partial(ViT, width=32, depth=2, patch_size=2),
    # scikit-learn digits, 8 x 8 x 1 inputs.
    "digits_cnn": DigitsCNN,
    "digits_mlp": DigitsMLP,
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """The named model, unbound; ``kwargs`` set other fields (``dtype``, ...).

  Raises:
    ValueError: for a name not in ``MODEL_NAMES``; the message lists them.
  """
  if name not in _REGISTRY:
    available = ", ".join(MODEL_NAMES)
    raise ValueError(f"Unknown model {name!r}; available: {available}.")
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree of arrays or of ``jax.ShapeDtypeStruct``."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


__all__ = [
    "CifarResNet",
    "DigitsCNN",
    "DigitsMLP",
    "MODEL_NAMES",
    "ResNet",
    "SmallCNN",
    "ViT",
    "WideResNet",
    "count_params",
    "create_model",
]
