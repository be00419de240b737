"""A planted straggler: rank 1 sleeps 250 ms in every forward; every other rank waits for it."""
import os
import time

import torch

BATCH_SIZE = 16
SLOW_RANK = 1


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def make_batch(batch_size):
    return torch.randn(batch_size, 32), torch.randint(0, 8, (batch_size,))


def forward(model, batch):
    if int(os.environ.get("RANK", "0")) == SLOW_RANK:
        time.sleep(0.25)
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)
