import torch
import torch.nn as nn


def build_model():
    return nn.Linear(10, 2)


def forward(model, batch):
    return model(batch)
