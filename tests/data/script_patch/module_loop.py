# A tiny MLP regression trained by a loop at module level, batches drawn by hand, AdamW.
# (a fixture for the script patcher)
import sys

import torch
from torch import nn

torch.manual_seed(0)
STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5

model = nn.Sequential(
    nn.Linear(32, 64),
    nn.GELU(),
    nn.Linear(64, 1),
)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
data = torch.randn(STEPS, 8, 32)
target = data.sum(-1, keepdim=True)

for i in range(STEPS):
    pred = model(data[i])
    loss = ((pred - target[i]) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    print(f"step {i} loss {loss.item():.6f}")
