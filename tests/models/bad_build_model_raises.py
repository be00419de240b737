import torch
import torch.nn as nn

CONFIG = {"hidden": 32}


def build_model():
    return nn.Sequential(nn.Linear(10, CONFIG["hidden_size"]), nn.ReLU(), nn.Linear(CONFIG["hidden"], 2))


def make_batch(batch_size):
    return torch.randn(batch_size, 10)
