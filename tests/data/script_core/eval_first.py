"""Evaluates the model (under no_grad, on a bigger batch) before each epoch of training."""
import torch
import torch.nn as nn


def evaluate(net, x):
    with torch.no_grad():
        return net(x).mean().item()


def main():
    net = nn.Linear(8, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for epoch in range(100):
        evaluate(net, torch.randn(64, 8))
        for _ in range(3):
            x = torch.randn(4, 8)
            pred = net(x)
            loss = (pred - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


if __name__ == "__main__":
    main()
