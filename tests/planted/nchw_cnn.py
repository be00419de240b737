"""Planted bottleneck (AO2, memory layout): a convolutional network in NCHW layout.

Three 3x3 convolutions on 3x16x16 images, batch 128, model and inputs in the default
contiguous (NCHW) layout. oneDNN on a CPU and cuDNN's tensor-core kernels on a GPU run
convolutions natively in channels_last (NHWC), so they convert or fall back to slower
kernels. Nothing else is planted: foreach SGD, no DataLoader, few operators.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 128
CLASSES = 10


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(x, 1))


def build_model() -> nn.Module:
    return SmallCNN()


def _patterns() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    return torch.randn(CLASSES, 3, 16, 16, generator=g)


def make_batch(batch_size: int):
    y = torch.randint(0, CLASSES, (batch_size,))
    x = _patterns()[y] + torch.randn(batch_size, 3, 16, 16)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
