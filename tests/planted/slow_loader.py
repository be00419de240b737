"""Planted bottleneck (AO5, input pipeline): a slow DataLoader with no worker processes.

Each sample is decoded on the fly: __getitem__ runs a real CPU computation (a numpy FFT
filter over a synthetic 1024-point signal, then summary features), and the DataLoader has
num_workers=0, so the training step waits for the batch to be built in the main process.
The model itself is small (a 3-layer MLP, foreach SGD, batch 96), so no other family has
a reason to fire. make_batch() builds the same kind of batch directly, for verification.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

BATCH_SIZE = 96
SIGNAL = 1024
FEATURES = 64
CLASSES = 4
DATASET_SIZE = 1024


def _features(seed: int) -> tuple[np.ndarray, int]:
    """Decode one sample: a noisy multi-tone signal, band-pass filtered in the frequency
    domain, summarised as 64 band energies (about a millisecond of numpy work per sample). The label is the strongest tone."""
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
    feats = np.log1p(bands.mean(axis=1)).astype(np.float32)
    return feats, label


class SignalDataset(Dataset):
    def __len__(self) -> int:
        return DATASET_SIZE

    def __getitem__(self, i: int):
        feats, label = _features(int(i))
        # tensors, not numpy arrays: the default collate then stacks them in one operator
        return torch.from_numpy(feats), label


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


def build_dataloader(batch_size: int) -> DataLoader:
    g = torch.Generator().manual_seed(7)
    return DataLoader(SignalDataset(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0, generator=g)
