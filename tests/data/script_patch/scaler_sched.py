"""A transformer-ish classifier trained with mixed precision the user already set up: autocast
behind a flag, a GradScaler, gradient clipping and a one-cycle LR scheduler (a fixture for the
script patcher; not run by the tests)."""
import argparse

import torch
from torch import nn


def build_model(vocab: int, dim: int) -> nn.Module:
    return nn.Sequential(nn.Embedding(vocab, dim), nn.Flatten(), nn.Linear(dim * 16, 4))


def train(args):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(1000, args.dim).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=3e-4,
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=args.steps)
    scaler = torch.cuda.amp.GradScaler(enabled=args.amp)

    for step in range(args.steps):
        x = torch.randint(0, 1000, (args.batch_size, 16), device=device)
        y = torch.randint(0, 4, (args.batch_size,), device=device)
        with torch.autocast(device_type=device, enabled=args.amp):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--amp", action="store_true")
    train(parser.parse_args())
