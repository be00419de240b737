"""An MLP classifier on synthetic tabular data, trained with Adam, fed by a DataLoader.

Shows the optional build_dataloader(): the input pipeline is then part of the profiled
step, and the optional evaluate(model): held-out metrics autoopt compares between the
baseline and every variant after the same training steps (a variant that loses accuracy
is rejected). make_batch() builds the same kind of batch directly (autoopt uses it to verify
numerics on identical batches). Labels come from a fixed random teacher network, so
the task is learnable and deterministic.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 256
IN_FEATURES = 64
NUM_CLASSES = 8
DATASET_SIZE = 4096
HELD_OUT_SIZE = 512


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, NUM_CLASSES),
    )


def _teacher() -> torch.Tensor:
    g = torch.Generator().manual_seed(4321)
    return torch.randn(IN_FEATURES, NUM_CLASSES, generator=g)


def _samples(n: int, generator=None):
    x = torch.randn(n, IN_FEATURES, generator=generator)
    y = (x @ _teacher()).argmax(dim=1)
    return x, y


def make_batch(batch_size: int):
    return _samples(batch_size)


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def build_dataloader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    x, y = _samples(DATASET_SIZE, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)


def evaluate(model: nn.Module) -> dict:
    """Accuracy and loss on a small held-out set (its own generator: never the training data).
    autoopt calls it in eval mode without gradients; the data goes to the model's device."""
    g = torch.Generator().manual_seed(99)
    x, y = _samples(HELD_OUT_SIZE, generator=g)
    device = next(model.parameters()).device
    logits = model(x.to(device)).float()
    y = y.to(device)
    return {"accuracy": (logits.argmax(dim=1) == y).float().mean().item(),
            "loss": F.cross_entropy(logits, y).item()}
