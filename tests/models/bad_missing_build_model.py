import torch
import torch.nn as nn


def build_models():  # misspelt: the contract asks for build_model
    return nn.Linear(10, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 10)
