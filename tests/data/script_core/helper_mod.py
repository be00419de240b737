"""A module next to uses_helper.py, imported the way scripts import their own files."""
import torch.nn as nn


def make_model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
