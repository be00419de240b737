"""Planted bottleneck (AO7, optimizer): Adam's per-parameter Python loop.

Adam with foreach=False updates each of the ten parameter tensors one at a time with
about a dozen operators each, and those updates are memory-bound passes over 0.6 M
numbers: a sizeable share of a step whose forward and backward are a few small GEMMs.
The foreach or fused implementation does the same update in a few multi-tensor
operations. Nothing else is planted: no convolutions, no DataLoader, batch 128.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 128
WIDTH = 384
CLASSES = 10


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def make_batch(batch_size: int):
    x = torch.randn(batch_size, WIDTH)
    y = (x[:, :CLASSES] * 2).argmax(dim=1)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)  # planted: the per-parameter loop
