"""A rank that crashes: rank 1 raises in its second profiled step (while the profiler
records), after the other ranks have started writing their traces."""
import os

import torch

BATCH_SIZE = 8
_calls = {"profiled": 0}


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def make_batch(batch_size):
    return torch.randn(batch_size, 16), torch.randint(0, 4, (batch_size,))


def forward(model, batch):
    if int(os.environ.get("RANK", "0")) == 1 and torch.autograd._profiler_enabled():
        _calls["profiled"] += 1
        if _calls["profiled"] == 2:
            raise ValueError("planted failure on rank 1")
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05)
