import numpy as np
import torch.nn as nn


def build_model():
    return nn.Linear(10, 2)


def make_batch(batch_size):
    # numpy arrays: autoopt needs torch tensors
    return np.random.randn(batch_size, 10).astype("float32")
