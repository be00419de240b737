"""autoopt adapter, written for autoopt's tests (not part of d2l): the LeNet of "Dive into Deep
Learning" (d2l_torch.py beside this file: the d2l 1.0.3 wheel's d2l/torch.py, verbatim), with its
sigmoid activations, set up as the book's LeNet section does: `LeNet(lr=0.1)`, its lazy layers
materialised on a batch and initialised with the book's init_cnn (Xavier uniform) through
`apply_init`, the loss of its Classifier (cross-entropy), the optimizer of its Module
(`configure_optimizers`: SGD at the model's lr), batches of 128 Fashion-MNIST-shaped images in [0, 1]
(the book's ToTensor range) with random labels. The file imports torchvision, pandas, matplotlib and
IPython at its top, so only the definitions LeNet needs run (published.definitions)."""
import importlib.util
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BATCH_SIZE = 128
NAMES = {"d2l", "nn_Module", "HyperParameters", "ProgressBoard", "Module", "Classifier", "LeNet", "init_cnn",
         "reshape", "astype", "argmax", "reduce_mean", "float32"}


def _d2l():
    spec = importlib.util.spec_from_file_location("_health_outside_published", HERE.parent / "published.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    return helper.definitions("_health_outside_d2l_torch", [(HERE / "d2l_torch.py", NAMES)])


def build_model():
    d2l = _d2l()
    model = d2l.LeNet(lr=0.1)
    model.apply_init([torch.rand(BATCH_SIZE, 1, 28, 28)], d2l.init_cnn)
    return model


def make_batch(n):
    return torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,))


def forward(model, batch):
    x, y = batch
    return model.loss(model(x), y)


def build_optimizer(model):
    return model.configure_optimizers()
