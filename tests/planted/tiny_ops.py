"""Planted bottleneck (AO3, compilation and launch overhead): thousands of tiny operators.

A learned elementwise activation is applied as a Python loop of 60 residual terms on a
(128 x 32) activation: each term is a handful of operators on 4096 numbers, so the step
runs several hundred operators (forward and backward) that each do almost no work —
per-operator dispatch (and on a GPU, per-kernel launch) dominates the step. No
convolutions, no DataLoader, a foreach optimizer over five parameters, batch 128.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 128
FEATURES = 32
TERMS = 60
CLASSES = 10


class TinyOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(FEATURES, FEATURES)
        self.coef = nn.Parameter(torch.randn(TERMS, FEATURES) * 0.05)
        self.out = nn.Linear(FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i in range(TERMS):  # planted: one tiny elementwise chain per term
            h = h + torch.tanh(h * self.coef[i]) * 0.1
        return self.out(h)


def build_model() -> nn.Module:
    return TinyOps()


def make_batch(batch_size: int):
    x = torch.randn(batch_size, FEATURES)
    y = (x[:, :CLASSES] * 2).argmax(dim=1)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
