"""A tiny model file for distributed tests: a two-layer MLP trained with SGD."""
import torch

BATCH_SIZE = 16


def build_model():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


def make_batch(batch_size):
    return torch.randn(batch_size, 32), torch.randint(0, 8, (batch_size,))


def forward(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
