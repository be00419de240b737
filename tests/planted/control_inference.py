"""Control (AO7 stays silent): the optimizer_loop.py model, inference only.

Same MLP as the planted optimizer_loop.py, with no build_optimizer: autoopt profiles
forward passes under torch.no_grad(), there is no optimizer.step, and no optimizer
rule may fire.
"""
import torch
import torch.nn as nn

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


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, WIDTH)
