"""GPT-2 small causal language-model training (Hugging Face transformers).

The workload: decoder-only LM pre-training, the nanoGPT / GPT-2 reproduction job:
`GPT2LMHeadModel(GPT2Config())` — GPT-2 small: 12 layers, width 768, 12 heads, vocabulary
50257, context 1024, dropout 0.1, tied input/output embeddings; 124 M parameters — with
random initialisation built in code (no download, no network), sequences of 256 tokens,
the causal LM loss (`labels=input_ids`; the model shifts them) and AdamW at lr 6e-4,
weight decay 0.1 on the matrices only (as nanoGPT), betas (0.9, 0.95).

The data is synthetic: random token ids over the whole vocabulary, drawn from a dedicated
generator seeded from the seed autoopt sets before make_batch. A real corpus would need a
download and a tokenizer; the step's compute does not depend on which tokens they are
(the loss stays near ln(50257) ~ 10.8, since random tokens cannot be predicted).

What autoopt's transforms are expected to do on a GPU: bf16 autocast (the linear layers
and the 50257-wide LM head, the largest matmul, on tensor cores), SDPA (transformers'
GPT-2 attention dispatches to scaled_dot_product_attention with a causal mask; flash
kernels need bf16/fp16), torch.compile (fuses LayerNorm, GELU, dropout and the residual
adds), fused AdamW, and a larger batch or gradient accumulation where memory binds: the
logits alone are batch x 256 x 50257 floats. channels_last does not apply.

Needs transformers (`pip install -e '.[zoo]'`).

Environment (read when the file is imported): AUTOOPT_ZOO_SEQ_LEN, the sequence length in
tokens (default 256, at most 1024); smaller values keep CPU runs and tests short.
"""
import os

import torch
from transformers import GPT2Config, GPT2LMHeadModel

BATCH_SIZE = 8
SEQ_LEN = int(os.environ.get("AUTOOPT_ZOO_SEQ_LEN", "256"))
DATA_SEED = 80_000  # added to autoopt's seed: the data generator's seed


def build_model():
    model = GPT2LMHeadModel(GPT2Config())
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, without warning that it does
    return model


def make_batch(batch_size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(DATA_SEED + torch.initial_seed() % (2**31))
    return torch.randint(0, GPT2Config().vocab_size, (batch_size, SEQ_LEN), generator=g)


def forward(model, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


def build_optimizer(model) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]  # the tied embedding once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4,
        betas=(0.9, 0.95),
    )
