import torch
import torch.nn as nn

# reads a data file at import time; the file is not there
with open("data/train_labels.csv") as f:
    LABELS = f.read().split()


def build_model():
    return nn.Linear(10, len(LABELS))


def make_batch(batch_size):
    return torch.randn(batch_size, 10)
