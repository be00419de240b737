"""The model file inside a folder that a user passes by mistake (the loader's error
names this file as the one to pass instead)."""
import torch


def build_model():
    return torch.nn.Linear(4, 2)


def make_batch(batch_size: int):
    return torch.randn(batch_size, 4)
