"""Planted bottleneck (AO1, precision): large fp32 matrix multiplications.

A wide MLP (four 384x384 hidden layers) on batches of 256: nearly all of the step is fp32
GEMM time, which bf16 (or fp16) tensor cores, TF32, or a CPU with AVX-512 BF16 / AMX
would run several times faster. Nothing else is planted: foreach SGD, no convolutions,
no DataLoader, few operators, a batch large enough to keep the matrices busy.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 256
IN = 128
WIDTH = 384
CLASSES = 16


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def make_batch(batch_size: int):
    x = torch.randn(batch_size, IN)
    y = (x[:, :CLASSES] * 2).argmax(dim=1)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
