"""Control (AO5 stays silent): the slow_loader.py model without a DataLoader.

Same features, model and optimizer as the planted slow_loader.py, but there is no
build_dataloader: autoopt builds a few batches with make_batch once, up front, so the
step is pure compute and no input-pipeline rule has anything to say.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 96
SIGNAL = 1024
FEATURES = 64
CLASSES = 4


def _features(seed: int) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    t = np.arange(SIGNAL) / SIGNAL
    label = int(rng.integers(CLASSES))
    freqs = np.array([40.0, 90.0, 160.0, 250.0])
    amps = rng.uniform(0.2, 0.6, CLASSES)
    amps[label] = 1.0
    sig = (amps[:, None] * np.sin(2 * np.pi * freqs[:, None] * t[None, :])).sum(0)
    sig += rng.normal(0.0, 0.5, SIGNAL)
    spec = np.fft.rfft(sig)
    spec[:10] = 0.0
    filtered = np.fft.irfft(spec, n=SIGNAL)
    bands = np.abs(np.fft.rfft(filtered))[: FEATURES * 8].reshape(FEATURES, 8)
    return np.log1p(bands.mean(axis=1)).astype(np.float32), label


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, CLASSES))


def make_batch(batch_size: int):
    seeds = torch.randint(0, 10**6, (batch_size,)).tolist()
    samples = [_features(s) for s in seeds]
    x = torch.from_numpy(np.stack([f for f, _ in samples]))
    y = torch.tensor([label for _, label in samples])
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=True)
