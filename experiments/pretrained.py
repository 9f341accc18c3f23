"""Pretrained weights: torchvision/timm ImageNet ResNets; our own variables.

Our ResNet names its modules after torchvision's state-dict keys, so loading
is a rename plus a layout change, and needs no torch::

  conv1.weight                  params/conv1/kernel (OIHW -> HWIO)
  bn1.{weight, bias}            params/bn1/{scale, bias}
  bn1.running_{mean, var}       batch_stats/bn1/{mean, var}
  layer2.0.conv1.weight         params/stage2/block0/conv1/kernel
  layer2.0.downsample.{0, 1}.*  .../stage2/block0/downsample_{conv, bn}/*
  fc.{weight, bias}             params/head/{kernel, bias} (kernel transposed)

BatchNorm already uses torch's eps (1e-5) and momentum (0.1, Flax's 0.9).
``num_batches_tracked`` buffers play no part in inference and are ignored.
Inputs are then expected as torchvision's, but NHWC: RGB in [0, 1] normalised
with the ImageNet mean and standard deviation.
"""

import os
from typing import Any, Mapping

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

try:  # Not a core dependency: only this module reads .safetensors files.
  import safetensors.numpy
except ImportError as err:
  raise ImportError(
      "experiments.pretrained reads .safetensors files: pip install "
      "safetensors (it comes with the experiments extra).") from err

from ot_transfer_jax.models import create_model

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

_MODULE_NAMES = {
    "downsample_conv": "downsample.0",
    "downsample_bn": "downsample.1",
    "head": "fc",
}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _torch_key(flax_key: tuple[str, ...]) -> str:
  """E.g. ("params", "stage1", "block0", "downsample_conv", "kernel") ->
  "layer1.0.downsample.0.weight"."""
  collection, *modules, leaf = flax_key
  names = []
  for name in modules:
    if name.startswith("stage"):
      name = "layer" + name.removeprefix("stage")
    elif name.startswith("block"):
      name = name.removeprefix("block")
    names.append(_MODULE_NAMES.get(name, name))
  return ".".join(names + [_LEAF_NAMES[collection, leaf]])


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
  """Conv kernels HWIO -> OIHW, dense (in, out) -> (out, in), vectors as is."""
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  return array.T if array.ndim == 2 else array


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
  """Inverse of :func:`_to_torch_layout`."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  return array.T if array.ndim == 2 else array


def load_torchvision_resnet(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any], model_name: str
) -> dict[str, Any]:
  """Variables for ``create_model(model_name)`` from a torchvision state dict.

  Args:
    path_or_state_dict: a ``.safetensors`` file, or a mapping from torch keys
      to arrays (numpy arrays or CPU tensors).
    model_name: one of ``TORCHVISION_RESNETS``.
  Returns:
    ``{"params": ..., "batch_stats": ...}`` of float32 arrays for
    ``create_model(model_name, num_classes)`` with
    ``num_classes = fc.weight.shape[0]``.
  Raises:
    ValueError: for another model, or listing every missing key, unexpected
      key and shape mismatch.
  """
  if model_name not in TORCHVISION_RESNETS:
    raise ValueError(
        f"No torchvision layout for {model_name!r}; supported:"
        f" {TORCHVISION_RESNETS}."
    )
  if isinstance(path_or_state_dict, (str, os.PathLike)):
    state_dict = safetensors.numpy.load_file(os.fspath(path_or_state_dict))
  else:
    state_dict = {
        key: np.asarray(value) for key, value in path_or_state_dict.items()
    }
  state_dict = {
      k: v
      for k, v in state_dict.items()
      if not k.endswith("num_batches_tracked")
  }
  if "fc.weight" not in state_dict:
    raise ValueError(
        f"State dict has no 'fc.weight'; keys: {sorted(state_dict)[:20]}..."
    )

  model = create_model(model_name, num_classes=state_dict["fc.weight"].shape[0])
  # Shapes only: parameter shapes do not depend on the input resolution.
  abstract = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  expected = flax.traverse_util.flatten_dict(abstract)
  torch_keys = {_torch_key(key): key for key in expected}

  missing = sorted(set(torch_keys) - set(state_dict))
  unexpected = sorted(set(state_dict) - set(torch_keys))
  mismatched, flat = [], {}
  for torch_key, flax_key in torch_keys.items():
    if torch_key not in state_dict:
      continue
    array = _to_flax_layout(np.asarray(state_dict[torch_key], np.float32))
    if array.shape != expected[flax_key].shape:
      want = _to_torch_layout(
          np.empty(expected[flax_key].shape, np.float32)
      ).shape
      mismatched.append(
          f"{torch_key}: got {tuple(state_dict[torch_key].shape)},"
          f" expected {want}"
      )
    flat[flax_key] = jnp.asarray(array)
  problems = [
      f"{label}: {', '.join(items)}"
      for label, items in (
          ("missing", missing),
          ("unexpected", unexpected),
          ("shape mismatch", mismatched),
      )
      if items
  ]
  if problems:
    raise ValueError(
        f"Cannot load state dict into {model_name}. " + "; ".join(problems)
    )
  return flax.traverse_util.unflatten_dict(flat)


def to_torchvision_state_dict(
    variables: Mapping[str, Any],
) -> dict[str, np.ndarray]:
  """Inverse of :func:`load_torchvision_resnet`, without num_batches_tracked."""
  flat = flax.traverse_util.flatten_dict(variables)
  return {
      _torch_key(key): np.ascontiguousarray(_to_torch_layout(np.asarray(v)))
      for key, v in flat.items()
  }


def save_variables_safetensors(
    variables: Mapping[str, Any], path: str | os.PathLike
) -> None:
  """Writes a pytree of arrays as safetensors, keyed by "/"-joined paths."""
  flat = flax.traverse_util.flatten_dict(variables, sep="/")
  safetensors.numpy.save_file(
      {k: np.asarray(v) for k, v in flat.items()}, os.fspath(path)
  )


def load_variables_safetensors(path: str | os.PathLike) -> dict[str, Any]:
  """Reads :func:`save_variables_safetensors`'s file: nested dicts of arrays."""
  flat = safetensors.numpy.load_file(os.fspath(path))
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v) for k, v in flat.items()}, sep="/"
  )
