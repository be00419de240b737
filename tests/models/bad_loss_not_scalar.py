import torch
import torch.nn as nn
import torch.nn.functional as F


def build_model():
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def make_batch(batch_size):
    return torch.randn(batch_size, 20), torch.randint(0, 5, (batch_size,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")  # one loss per sample, not a scalar


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)
