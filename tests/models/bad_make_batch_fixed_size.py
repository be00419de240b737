import torch
import torch.nn as nn


def build_model():
    return nn.Linear(10, 2)


def make_batch(batch_size):
    return torch.randn(8, 10)  # ignores batch_size
