"""Control (AO6 stays silent): the host_read.py network without the host reads.

Same residual blocks as the planted host_read.py, but each block normalises by a scale
computed on the device (a tensor, never `.item()`), so nothing in the step waits for the
device.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 128
WIDTH = 128
BLOCKS = 8
CLASSES = 10


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        scale = h.detach().abs().amax()  # stays on the device
        return x + h / (scale + 1e-6)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*(Block(WIDTH) for _ in range(BLOCKS)))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def build_model() -> nn.Module:
    return Net()


def make_batch(batch_size: int):
    x = torch.randn(batch_size, WIDTH)
    y = (x[:, :CLASSES] * 3).argmax(dim=1)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
