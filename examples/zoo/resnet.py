"""ResNet-50 image classification training, as in torchvision's ImageNet reference recipe.

The workload: the convnet most GPU training benchmarks start from. The architecture is
torchvision's resnet50 written out in plain torch (torchvision cannot be imported beside
the CPU torch wheel this project is tested with): a 7x7 stem, Bottleneck blocks [3, 4, 6, 3]
with the stride on the 3x3 convolution ("ResNet v1.5"), BatchNorm after every convolution,
global average pooling and a 1000-class linear head; 25.6 M parameters. Initialisation as
torchvision's: Kaiming-normal (fan_out) convolutions, BatchNorm weight 1 / bias 0, no
zero-init of the last BatchNorm of each block. Training follows the reference recipe: SGD,
lr 0.1, momentum 0.9, weight decay 1e-4, cross-entropy.

The data is synthetic: random 224x224 RGB images with random labels over the 1000 classes,
drawn from a dedicated generator seeded from the seed autoopt sets before make_batch (so a
batch depends only on that seed). A real ImageNet pipeline would need a download and JPEG
decoding; the step's compute (what autoopt optimizes here) does not depend on what the
pixels show. The labels are random, so the loss only starts to fall by memorisation.

What autoopt's transforms are expected to do on a GPU: bf16 autocast (convolutions and the
head on tensor cores), channels_last memory layout (cuDNN's NHWC kernels, and no layout
transposes around them under autocast), torch.compile (fuses BatchNorm + ReLU and the
residual adds), cuDNN benchmark mode, a foreach/fused SGD step, and a larger batch where
the GPU's memory allows it. ResNet-50 has no attention, so SDPA does not apply.

This file also defines `resnet18()` (BasicBlock [2, 2, 2, 2], 11.7 M parameters), which
`resnet18.py` beside it imports.

Environment (read when the file is imported): AUTOOPT_ZOO_IMAGE_SIZE, the image side in
pixels (default 224); smaller sizes (e.g. 64) keep CPU runs and tests short.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32
NUM_CLASSES = 1000
IMAGE_SIZE = int(os.environ.get("AUTOOPT_ZOO_IMAGE_SIZE", "224"))
DATA_SEED = 50_000  # added to autoopt's seed: the data generator's seed


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers: list, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = NUM_CLASSES) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet18(num_classes: int = NUM_CLASSES) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def image_batch(batch_size: int, image_size: int, num_classes: int = NUM_CLASSES):
    """Random images (N, 3, H, W) and random labels from a generator seeded from the seed
    autoopt set (torch.initial_seed()), so the batch depends on that seed only."""
    g = torch.Generator().manual_seed(DATA_SEED + torch.initial_seed() % (2**31))
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g)
    return images, labels


def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def reference_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """torchvision's reference recipe: SGD, lr 0.1, momentum 0.9, weight decay 1e-4."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def build_model() -> nn.Module:
    return resnet50()


def make_batch(batch_size: int):
    return image_batch(batch_size, IMAGE_SIZE)


def forward(model: nn.Module, batch) -> torch.Tensor:
    return classification_loss(model, batch)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return reference_sgd(model)
