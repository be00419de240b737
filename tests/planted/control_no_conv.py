"""Control (AO2 stays silent): image batches, but no convolutions.

The same 3x16x16 images as the planted nchw_cnn.py, classified by a flatten + MLP: the
input is 4-D and NCHW, yet there is no convolution that channels_last could speed up.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 128
CLASSES = 10


def build_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 128), nn.ReLU(), nn.Linear(128, CLASSES))


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
