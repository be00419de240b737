"""autoopt adapter, written for autoopt's tests (not part of torchvision): torchvision's VGG class
(vgg.py beside this file, verbatim from the torchvision 0.29.1 wheel) in configuration "E" (VGG-19,
no batch norm), initialised and trained as the VGG paper (Simonyan & Zisserman, ICLR 2015, section
3.1) trains its networks from scratch: weights from a zero-mean normal with standard deviation 1e-2,
biases zero; SGD with momentum 0.9, learning rate 1e-2, weight decay 5e-4. The paper trains only its
shallowest configuration "A" (VGG-11) that way and starts the deeper ones from A's trained layers,
"since bad initialisation can stall learning due to the instability of gradient in deep nets".
Batches are 32x32 (the smallest input torchvision's VGG weights list) of normal noise with random
ImageNet labels: 224x224 would cost ~50x more per step. See ATTRIBUTION.md."""
import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CONFIG = "E"
BATCH_SIZE = 4


def _published():
    spec = importlib.util.spec_from_file_location("_health_outside_published", HERE.parent / "published.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    return helper.definitions("_health_outside_torchvision_vgg", [
        (HERE / "torchvision_utils.py", {"_log_api_usage_once"}),
        (HERE / "vgg.py", {"VGG", "make_layers", "cfgs"}),
    ])


def build_model():
    tv = _published()
    # init_weights=False: torchvision's own init (He for the convolutions) is replaced by the paper's
    model = tv.VGG(tv.make_layers(tv.cfgs[CONFIG], batch_norm=False), init_weights=False)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, 0.0, 1e-2)
            torch.nn.init.zeros_(m.bias)
    return model


def make_batch(n):
    return torch.randn(n, 3, 32, 32), torch.randint(0, 1000, (n,))


def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=5e-4)
