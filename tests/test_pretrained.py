"""torchvision ResNet weights: after conversion, our logits equal torch's.

The reference networks (tests/torch_reference.py) need torch, which is not in
the test extra: with the `torch` extra installed those tests run, otherwise
they are skipped with the reason. The other tests need no torch.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax.models import create_model
from experiments.pretrained import (
    load_torchvision_resnet,
    load_variables_safetensors,
    save_variables_safetensors,
    to_torchvision_state_dict,
)


def _torch_installed() -> bool:
  try:
    return importlib.util.find_spec("torch") is not None
  except (ImportError, ValueError):  # Blocked or half-installed.
    return False


requires_torch = pytest.mark.skipif(
    not _torch_installed(),
    reason="torch is not installed: the torchvision-weights check compares "
    "with a torch reference network; pip install -e '.[torch]' to run it.")


@requires_torch
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_match_torch(name, tmp_path):
  import torch
  from safetensors.torch import save_file
  from torch_reference import random_torch_resnet
  num_classes = 7
  net = random_torch_resnet(name, num_classes)
  path = tmp_path / f"{name}.safetensors"
  save_file(net.state_dict(), str(path))

  variables = load_torchvision_resnet(path, name)
  model = create_model(name, num_classes)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()

  assert ours.shape == (2, num_classes)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


@requires_torch
def test_accepts_in_memory_torch_state_dict_and_round_trips():
  from torch_reference import random_torch_resnet
  net = random_torch_resnet("resnet18", 5)
  state_dict = net.state_dict()
  variables = load_torchvision_resnet(state_dict, "resnet18")
  back = to_torchvision_state_dict(variables)
  expected = {k: v for k, v in state_dict.items() if "num_batches" not in k}
  assert set(back) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


@pytest.mark.slow  # Several seconds of compilation: full suite only.
def test_missing_unexpected_and_mismatched_keys_are_listed():
  # A complete torchvision-layout state dict (numpy), made from our own model.
  model = create_model("resnet18", 5)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3))))(
      jax.random.PRNGKey(0))
  state_dict = dict(to_torchvision_state_dict(variables))
  assert "layer2.1.bn2.running_var" in state_dict
  del state_dict["layer2.1.bn2.running_var"]
  state_dict["layer5.0.conv1.weight"] = np.zeros((1,), np.float32)
  state_dict["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ValueError) as info:
    load_torchvision_resnet(state_dict, "resnet18")
  message = str(info.value)
  assert "missing: layer2.1.bn2.running_var" in message
  assert "unexpected: layer5.0.conv1.weight" in message
  assert (
      "layer1.0.conv1.weight: got (64, 64, 1, 1), expected (64, 64, 3, 3)"
      in message
  )


def test_unsupported_model_name():
  with pytest.raises(ValueError, match="resnet50"):
    load_torchvision_resnet({}, "resnet20")


def test_variables_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  variables = {
      "params": {
          "stage1": {"conv": {"kernel": rng.normal(size=(3, 3, 1, 4))}},
          "head": {"kernel": rng.normal(size=(4, 10)), "bias": np.zeros(10)},
      },
      "batch_stats": {
          "stage1": {"bn": {"mean": np.zeros(4), "var": np.ones(4)}}
      },
  }
  variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables)
  path = tmp_path / "variables.safetensors"
  save_variables_safetensors(variables, path)
  loaded = load_variables_safetensors(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
