"""Train a small CNN on a synthetic image-classification task.

An ordinary PyTorch training script: command-line arguments, a dataset, a DataLoader,
a model, an optimizer and a loop that prints the loss every few steps.

    python examples/train_script.py --epochs 2 --batch-size 32

It is also the example for `autoopt optimize --script examples/train_script.py -- ARGS`,
which optimizes a script like this one as it is, without editing it first.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


def parse_args():
    parser = argparse.ArgumentParser(description="Train a small CNN on synthetic images.")
    parser.add_argument("--epochs", type=int, default=10, help="number of passes over the training set")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="stop each epoch after this many steps (default: the whole training set)")
    parser.add_argument("--log-every", type=int, default=20, help="print the training loss every N steps")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_datasets(num_train, num_val, num_classes=10, image_size=16, seed=0):
    """Noisy copies of one random template per class: easy to learn, hard to memorise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, 3, image_size, image_size, generator=g)
    labels = torch.randint(0, num_classes, (num_train + num_val,), generator=g)
    images = templates[labels] + 2.0 * torch.randn(num_train + num_val, 3, image_size, image_size, generator=g)
    train = TensorDataset(images[:num_train], labels[:num_train])
    val = TensorDataset(images[num_train:], labels[num_train:])
    return train, val


def conv_bn_relu(in_channels, out_channels):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, width),
            nn.MaxPool2d(2),
            conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images).argmax(dim=1)
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / total


def main():
    args = parse_args()
    torch.manual_seed(args.seed)

    train_set, val_set = make_datasets(4096, 512, seed=args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=0)
    val_loader = DataLoader(val_set, batch_size=256, shuffle=False, num_workers=0)

    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)

    step = 0
    for epoch in range(args.epochs):
        model.train()
        epoch_start = time.perf_counter()
        for i, (images, labels) in enumerate(train_loader):
            if args.steps_per_epoch is not None and i >= args.steps_per_epoch:
                break
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % args.log_every == 0:
                print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
        train_time = time.perf_counter() - epoch_start
        accuracy = evaluate(model, val_loader)
        print(f"epoch {epoch} done: train {train_time:.3f} s, val accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
