"""torchvision ResNet weights: after conversion, our logits equal torch's.

torch is a test-only dependency. The reference networks below are written here
with torchvision's module names (conv1, bn1, layer1.0.conv1, ...,
downsample.0/1, fc), so torchvision itself is not needed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ot_transfer_jax.models import create_model
from ot_transfer_jax.models.pretrained import (
    load_torchvision_resnet,
    load_variables_safetensors,
    save_variables_safetensors,
    to_torchvision_state_dict,
)

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
nn = torch.nn


class _TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = _downsample(inplanes, planes, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class _TorchBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(4 * planes)
    self.relu = nn.ReLU()
    self.downsample = _downsample(inplanes, 4 * planes, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes, out, stride):
  if stride == 1 and inplanes == out:
    return None
  return nn.Sequential(
      nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
  )


class _TorchResNet(nn.Module):
  """torchvision.models.ResNet's layout and key names."""

  def __init__(self, block, layers, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU()
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for i, num_blocks in enumerate(layers):
      planes, blocks = 64 * 2**i, []
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        blocks.append(block(inplanes, planes, stride))
        inplanes = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(torch.flatten(self.avgpool(x), 1))


_TORCH_ARCHS = {
    "resnet18": (_TorchBasicBlock, (2, 2, 2, 2)),
    "resnet50": (_TorchBottleneck, (3, 4, 6, 3)),
}


def _random_torch_resnet(name, num_classes, seed=0):
  """Eval-mode torch ResNet with random weights *and* BN statistics/affines."""
  torch.manual_seed(seed)
  block, layers = _TORCH_ARCHS[name]
  net = _TorchResNet(block, layers, num_classes)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_logits_match_torch(name, tmp_path):
  num_classes = 7
  net = _random_torch_resnet(name, num_classes)
  path = tmp_path / f"{name}.safetensors"
  safetensors_torch.save_file(net.state_dict(), str(path))

  variables = load_torchvision_resnet(path, name)
  model = create_model(name, num_classes)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  ours = np.asarray(model.apply(variables, jnp.asarray(x), train=False))
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()

  assert ours.shape == (2, num_classes)
  scale = np.abs(ref).max()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * scale)


def test_accepts_in_memory_state_dict_and_round_trips():
  net = _random_torch_resnet("resnet18", 5)
  state_dict = net.state_dict()
  variables = load_torchvision_resnet(state_dict, "resnet18")
  back = to_torchvision_state_dict(variables)
  expected = {k: v for k, v in state_dict.items() if "num_batches" not in k}
  assert set(back) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)


def test_missing_unexpected_and_mismatched_keys_are_listed():
  state_dict = {
      k: v.numpy()
      for k, v in _random_torch_resnet("resnet18", 5).state_dict().items()
  }
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
