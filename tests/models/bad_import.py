import torch
import torch.nn as nn
import autoopt_test_missing_dependency  # not installed anywhere: the import fails


def build_model():
    return nn.Linear(10, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 10)
