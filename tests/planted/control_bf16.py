"""Control (AO1 stays silent): the fp32_gemm.py MLP, already under bf16 autocast.

Same model, data and optimizer as the planted fp32_gemm.py, but forward runs the model
and the loss under torch.autocast(dtype=torch.bfloat16) on whatever device the batch is
on, so no precision rule may propose autocast again (on a GPU or on a CPU with fast
bf16 alike).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 256
IN = 128
WIDTH = 384
CLASSES = 16


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(IN, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, CLASSES),
    )


def make_batch(batch_size: int):
    x = torch.randn(batch_size, IN)
    y = (x[:, :CLASSES] * 2).argmax(dim=1)
    return x, y


def forward(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        return F.cross_entropy(model(x), y)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
