"""Planted bottleneck (AO6, host-device synchronisation): a host read in every block.

Each of the 8 residual blocks normalises its activation by a scale read back to Python
with `.item()`. On a GPU every `.item()` waits until all queued kernels have finished,
so the host cannot run ahead and the GPU idles while the next block is launched. On a
CPU the read costs nothing measurable, but the trace still shows one `aten::item` per
block, at this file's line. Everything else is clean: foreach SGD, batch 128, no
convolutions, no DataLoader, few operators.
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
        scale = h.detach().abs().max().item()  # planted: the host reads a device value in every block
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
