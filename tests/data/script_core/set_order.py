"""Numbers its classes by iterating a set of strings, as opacus' char-LSTM example does
(`list({f.stem for f in root.iterdir()})`): the numbering, and so every loss, follows the
process's str hash seed."""
import torch
import torch.nn as nn

names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
labels = list({n for n in names})
index = {n: i for i, n in enumerate(labels)}
x = torch.randn(64, 8)
y = torch.tensor([index[names[i % 8]] for i in range(64)])
model = nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(1000):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
