"""autoopt adapter, written for autoopt's tests (not part of pytorchcv): pytorchcv's WRN-50-2
(wrn.py beside this file, verbatim from the pytorchcv 0.0.74 wheel) as `wrn50_2()` builds it: the
bottleneck wide ResNet in the form pytorchcv publishes it, with biased convolutions, identity and
projection shortcuts and no normalisation layer, initialised by the file's own _init_params (He
uniform for every convolution, PyTorch's default for the classifier). Trained with the ImageNet recipe
of the ResNet paper (He et al., 2016): SGD, learning rate 0.1, momentum 0.9, weight decay 1e-4.
Batches are 2 ImageNet-sized normal-noise images with random labels (the recipe: 256). See
ATTRIBUTION.md."""
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

BATCH_SIZE = 2


def build_model():
    spec = importlib.util.spec_from_file_location("_health_outside_pytorchcv_wrn", Path(__file__).with_name("wrn.py"))
    wrn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrn)
    return wrn.wrn50_2()


def make_batch(n):
    return torch.randn(n, 3, 224, 224), torch.randint(0, 1000, (n,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
