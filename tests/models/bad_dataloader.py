import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def build_model():
    return nn.Linear(10, 3)


def make_batch(batch_size):
    return torch.randn(batch_size, 10), torch.randint(0, 3, (batch_size,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


def build_dataloader(batch_size):
    return TensorDataset(torch.randn(1000, 10), torch.randint(0, 3, (1000,)))  # a Dataset, not a DataLoader
