"""ResNet-18 image classification training, as in torchvision's ImageNet reference recipe.

The workload: a small ImageNet convnet (torchvision's resnet18: BasicBlock [2, 2, 2, 2],
BatchNorm, 1000 classes, 11.7 M parameters), the "ResNet-18-class model" a time budget is
sized against. The architecture comes from `resnet.py` beside this file (plain torch, no
torchvision); the recipe is the reference one: SGD, lr 0.1, momentum 0.9, weight decay
1e-4, cross-entropy.

The data is synthetic: random 224x224 RGB images with random labels, drawn from a
dedicated generator seeded from the seed autoopt sets before make_batch. No download or
JPEG decoding: the step's compute does not depend on what the pixels show.

What autoopt's transforms are expected to do on a GPU: bf16 autocast, channels_last
(cuDNN's NHWC kernels), torch.compile (BatchNorm + ReLU and residual fusion), cuDNN
benchmark mode, a foreach/fused SGD step and a larger batch. ResNet-18 is light enough per
sample that at batch 32 a fast GPU also waits on kernel launches, which compilation and a
larger batch address. No attention, so SDPA does not apply.

Environment (read when the file is imported): AUTOOPT_ZOO_IMAGE_SIZE, the image side in
pixels (default 224); smaller sizes (e.g. 64) keep CPU runs and tests short.
"""
import os

import torch
import torch.nn as nn
from resnet import classification_loss, image_batch, reference_sgd, resnet18

BATCH_SIZE = 32
IMAGE_SIZE = int(os.environ.get("AUTOOPT_ZOO_IMAGE_SIZE", "224"))


def build_model() -> nn.Module:
    return resnet18()


def make_batch(batch_size: int):
    return image_batch(batch_size, IMAGE_SIZE)


def forward(model: nn.Module, batch) -> torch.Tensor:
    return classification_loss(model, batch)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return reference_sgd(model)
