"""Train a small transformer language model on a tokenised corpus.

The corpus is read from data/<dataset>/ under the current directory: train.bin and val.bin
(token ids, uint16, one after another) and meta.pkl (a dict with "vocab_size").

Every setting below is a module-level name; override any of them on the command line:

    python train.py --dataset=chars --max_iters=2000 --device=cuda --dtype=bfloat16
"""
import ast
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

from model import LMConfig, TinyLM

# ----------------------------------------------------------------------------- settings
dataset = "chars"
out_dir = "out"
device = "cpu"
dtype = "float32"  # float32 | bfloat16 | float16 (float16 trains with a GradScaler)
seed = 1337
# model
context = 64
layers = 2
heads = 4
width = 64
dropout = 0.0
# optimisation
batch_size = 16
accumulate = 2  # micro-batches per optimizer step
learning_rate = 3e-3
min_lr = 3e-4
warmup_iters = 20
max_iters = 300
weight_decay = 0.1
grad_clip = 1.0
# evaluation and logging
eval_interval = 100
eval_iters = 10
log_interval = 10
save_checkpoint = True

settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (bool, int, float, str))}
for arg in sys.argv[1:]:
    if not arg.startswith("--") or "=" not in arg:
        sys.exit(f"usage: python train.py [--name=value ...] (got {arg!r})")
    name, text = arg[2:].split("=", 1)
    if name not in settings:
        sys.exit(f"unknown setting {name!r}; settings: {', '.join(settings)}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(settings[name], float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(settings[name]):
        sys.exit(f"--{name} takes a {type(settings[name]).__name__}, got {text!r}")
    globals()[name] = settings[name] = value
print("settings:", " ".join(f"{k}={v}" for k, v in settings.items()))

# ----------------------------------------------------------------------------- setup
torch.manual_seed(seed)
os.makedirs(out_dir, exist_ok=True)
device_type = "cuda" if device.startswith("cuda") else "cpu"
amp_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=amp_dtype)
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))

data_dir = os.path.join("data", dataset)
tokens = {split: np.memmap(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
          for split in ("train", "val")}
with open(os.path.join(data_dir, "meta.pkl"), "rb") as f:
    vocab_size = pickle.load(f)["vocab_size"]


def get_batch(split):
    data = tokens[split]
    starts = torch.randint(len(data) - context - 1, (batch_size,)).tolist()
    x = torch.stack([torch.from_numpy(data[s:s + context].astype(np.int64)) for s in starts])
    y = torch.stack([torch.from_numpy(data[s + 1:s + 1 + context].astype(np.int64)) for s in starts])
    return x.to(device), y.to(device)


config = LMConfig(vocab_size=vocab_size, context=context, layers=layers, heads=heads, width=width, dropout=dropout)
model = TinyLM(config).to(device)
print(f"{model.num_params() / 1e3:.1f}k parameters, vocabulary of {vocab_size}")
optimizer = torch.optim.AdamW(model.parameter_groups(weight_decay), lr=learning_rate, betas=(0.9, 0.95))


def lr_at(it):
    """Linear warm-up, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    model.eval()
    result = {}
    for split in tokens:
        total = 0.0
        for _ in range(eval_iters):
            x, y = get_batch(split)
            with autocast:
                _, loss = model(x, y)
            total += loss.item()
        result[split] = total / eval_iters
    model.train()
    return result


# ----------------------------------------------------------------------------- training
best_val = float("inf")
x, y = get_batch("train")
t_last = time.time()
it = 0
while True:
    lr = lr_at(it)
    for group in optimizer.param_groups:
        group["lr"] = lr

    if it % eval_interval == 0:
        losses = estimate_loss()
        print(f"iter {it}: train {losses['train']:.4f}, val {losses['val']:.4f}")
        if losses["val"] < best_val:
            best_val = losses["val"]
            if it > 0 and save_checkpoint:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "config": settings, "iter": it, "best_val": best_val},
                           os.path.join(out_dir, "ckpt.pt"))

    for micro_step in range(accumulate):
        with autocast:
            _, loss = model(x, y)
            loss = loss / accumulate
        x, y = get_batch("train")  # the next batch, while this one's backward runs
        scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    now = time.time()
    if it % log_interval == 0:
        print(f"iter {it}: loss {loss.item() * accumulate:.4f}, lr {lr:.2e}, {(now - t_last) * 1000:.1f} ms")
    t_last = now
    it += 1
    if it > max_iters:
        break

print(f"done: {it} iterations, best val loss {best_val:.4f}")
