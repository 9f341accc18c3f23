"""torchvision's ResNets written in torch, with torchvision's module names
(conv1, bn1, layer1.0.conv1, ..., downsample.0/1, fc), so that torchvision
itself is not needed: the reference for tests/test_pretrained.py. Imported
only when torch is installed (the `torch` extra).
"""

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU()
    self.downsample = downsample(inplanes, planes, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBottleneck(nn.Module):
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
    self.downsample = downsample(inplanes, 4 * planes, stride)

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


def downsample(inplanes, out, stride):
  if stride == 1 and inplanes == out:
    return None
  return nn.Sequential(
      nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
  )


class TorchResNet(nn.Module):
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


TORCH_ARCHS = {
    "resnet18": (TorchBasicBlock, (2, 2, 2, 2)),
    "resnet50": (TorchBottleneck, (3, 4, 6, 3)),
}


def random_torch_resnet(name, num_classes, seed=0):
  """Eval-mode torch ResNet with random weights *and* BN statistics/affines."""
  torch.manual_seed(seed)
  block, layers = TORCH_ARCHS[name]
  net = TorchResNet(block, layers, num_classes)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()
