"""A script that never steps an optimizer: a few inference passes."""
import torch

model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
with torch.no_grad():
    for _ in range(5):
        out = model(torch.randn(32, 64))
print("done", tuple(out.shape))
