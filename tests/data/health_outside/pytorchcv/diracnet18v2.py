"""autoopt adapter, written for autoopt's tests (not part of pytorchcv): pytorchcv's DiracNetV2-18
(diracnetv2.py beside this file, verbatim from the pytorchcv 0.0.74 wheel) as `diracnet18v2()` builds
it: 18 layers in the form pytorchcv publishes them, pre-activation ReLU before each biased 3x3
convolution, no shortcut and no normalisation layer, initialised by the file's own _init_params (He
uniform for every convolution, PyTorch's default for the classifier). Trained with the ImageNet recipe
of the ResNet paper (He et al., 2016): SGD, learning rate 0.1, momentum 0.9, weight decay 1e-4.
Batches are 4 ImageNet-sized normal-noise images with random labels (the recipe: 256). See
ATTRIBUTION.md."""
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH_SIZE = 4


def build_model():
    spec = importlib.util.spec_from_file_location("_health_outside_pytorchcv_diracnetv2",
                                                  Path(__file__).with_name("diracnetv2.py"))
    diracnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diracnet)
    return diracnet.diracnet18v2()


def make_batch(n):
    return torch.randn(n, 3, 224, 224), torch.randint(0, 1000, (n,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
