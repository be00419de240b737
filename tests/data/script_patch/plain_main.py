"""A small CNN trained on random images: a plain loop in main(), argparse, a DataLoader,
SGD with momentum and `.item()` logging every few steps (a fixture for the script patcher)."""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=6, help="stop after this many steps")
    p.add_argument("--log-every", type=int, default=2)
    return p.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)
    images = torch.randn(128, 3, 16, 16)
    labels = torch.randint(0, 10, (128,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size, shuffle=True,
                        num_workers=0)

    model = Net()  # the model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    step = 0
    for epoch in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            # forward pass
            out = model(x)
            loss = criterion(out, y)
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.6f}")
            loss.backward()
            optimizer.step()
            step += 1
            if step >= args.steps:
                return


if __name__ == "__main__":
    main()
