"""A tiny CNN trained with SGD: the cheapest model file an optimize run can search over."""
import torch, torch.nn as nn, torch.nn.functional as F
BATCH_SIZE = 8
def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
def make_batch(bs):
    return torch.randn(bs, 3, 8, 8), torch.randint(0, 4, (bs,))
def forward(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)
def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
