"""A small CNN training script that writes what it sees (argv, working directory, torch's
settings, the memory format, dtypes and compilation of its model, its optimizer's and loader's
settings, the first gradient and the norm gradient clipping saw) to the JSON file --out after every step, for the driver's tests."""
import argparse
import json
import os
import random
import sys

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

SEEN = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        SEEN.setdefault("input_channels_last", x.is_contiguous(memory_format=torch.channels_last)
                        and not x.is_contiguous())
        SEEN.setdefault("autocast", torch.is_autocast_enabled("cpu"))
        h = torch.relu(self.conv(x))
        SEEN.setdefault("inner_dtype", str(h.dtype))
        return self.fc(h.flatten(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--own-scaler", action="store_true")
    parser.add_argument("--scheduler", action="store_true")
    args = parser.parse_args()
    SEEN.update(argv=sys.argv[1:], cwd=os.getcwd(), path0=sys.path[0], random=random.random(),
                matmul=torch.get_float32_matmul_precision(), threads=torch.get_num_threads())
    data = TensorDataset(torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu") if args.own_scaler else None
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1000) if args.scheduler else None
    for _ in range(args.epochs):
        for x, y in loader:
            out = model(x)
            SEEN.setdefault("output_dtype", str(out.dtype))
            loss = nn.functional.cross_entropy(out, y)
            opt.zero_grad()
            (scaler.scale(loss) if scaler else loss).backward()
            SEEN.setdefault("grad_norm", model.fc.weight.grad.norm().item())
            if scaler:
                scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # clips nothing: reports the norm
            SEEN.setdefault("clip_norm", norm.item())
            SEEN.update(fused=opt.param_groups[0].get("fused"), foreach=opt.param_groups[0].get("foreach"),
                        workers=loader.num_workers, persistent=loader.persistent_workers,
                        compiled=getattr(model, "_compiled_call_impl", None) is not None,
                        weight_channels_last=model.conv.weight.is_contiguous(memory_format=torch.channels_last))
            with open(args.out, "w") as f:
                json.dump(SEEN, f)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if sched:
                sched.step()


if __name__ == "__main__":
    main()
