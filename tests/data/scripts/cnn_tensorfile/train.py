"""Digit-style classifier: a small convolutional network written with explicit weights,
trained with SGD on images stored in a tensor file.

The data file holds {"train": (images, labels), "test": (images, labels)}: images are
float tensors of shape (N, 1, 16, 16) scaled to [-1, 1], labels are class indices.

    python train.py --data digits.pt --epochs 10 --batch-size 16
"""
import argparse
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="tensor file with the train and test splits")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save", default="", help="where to save the trained weights (optional)")
    return parser.parse_args()


def uniform(*shape, fan_in):
    bound = 2.4 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


class Net(nn.Module):
    """Two strided convolutions and two fully connected layers, tanh activations."""

    def __init__(self, num_classes):
        super().__init__()
        self.w1 = uniform(12, 1, 5, 5, fan_in=1 * 5 * 5)
        self.b1 = nn.Parameter(torch.zeros(12, 8, 8))
        self.w2 = uniform(12, 12, 5, 5, fan_in=12 * 5 * 5)
        self.b2 = nn.Parameter(torch.zeros(12, 4, 4))
        self.w3 = uniform(12 * 4 * 4, 30, fan_in=12 * 4 * 4)
        self.b3 = nn.Parameter(torch.zeros(30))
        self.w4 = uniform(30, num_classes, fan_in=30)
        self.b4 = nn.Parameter(-torch.ones(num_classes))

    def forward(self, x):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        x = torch.tanh(F.conv2d(x, self.w1, stride=2) + self.b1)
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
        x = torch.tanh(F.conv2d(x, self.w2, stride=2) + self.b2)
        x = torch.tanh(x.flatten(start_dim=1) @ self.w3 + self.b3)
        return torch.tanh(x @ self.w4 + self.b4)


def evaluate(model, images, labels):
    model.eval()
    with torch.no_grad():
        outputs = model(images)
        targets = F.one_hot(labels, outputs.size(1)).float() * 2 - 1
        loss = F.mse_loss(outputs, targets).item()
        errors = (outputs.argmax(dim=1) != labels).sum().item()
    model.train()
    return loss, errors / len(labels)


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    if not os.path.isfile(args.data):
        raise SystemExit(f"no data file {args.data}")
    data = torch.load(args.data)
    x_train, y_train = data["train"]
    x_test, y_test = data["test"]
    num_classes = int(y_train.max()) + 1
    print(f"{len(y_train)} training and {len(y_test)} test images, {num_classes} classes")

    model = Net(num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.epochs // 2), gamma=0.3)

    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train))
        running_loss = 0.0
        batches = 0
        for start in range(0, len(order), args.batch_size):
            idx = order[start:start + args.batch_size]
            images, labels = x_train[idx], y_train[idx]
            outputs = model(images)
            targets = F.one_hot(labels, num_classes).float() * 2 - 1
            loss = F.mse_loss(outputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            batches += 1
        scheduler.step()
        train_loss, train_err = evaluate(model, x_train, y_train)
        test_loss, test_err = evaluate(model, x_test, y_test)
        print(f"epoch {epoch}: loss {running_loss / batches:.4f} | train error {train_err * 100:.1f}% "
              f"| test loss {test_loss:.4f}, error {test_err * 100:.1f}%")

    if args.save:
        torch.save(model.state_dict(), args.save)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
