"""BERT-base fine-tuning for sequence classification (Hugging Face transformers).

The workload: the standard encoder fine-tuning job (GLUE-style, two labels): Hugging Face
`BertForSequenceClassification` built from `BertConfig()` — bert-base-uncased's shapes: 12
layers, width 768, 12 heads, vocabulary 30522, dropout 0.1; 109 M parameters — with
random initialisation built in code (no download, no network), sequences of 128 tokens,
AdamW at lr 2e-5. The batch is a dict (input_ids, attention_mask, token_type_ids, labels);
forward returns the model output's `.loss`.

The data is synthetic: random token ids, an attention mask of all ones (every sequence
full length, so the shapes are static) and random labels, drawn from a dedicated generator
seeded from the seed autoopt sets before make_batch. A real dataset would need a download
and a tokenizer; the step's compute does not depend on which tokens they are.

What autoopt's transforms are expected to do on a GPU: bf16 autocast (nearly all the time
is in linear layers), SDPA (transformers' BERT attention already dispatches to
scaled_dot_product_attention; its flash kernels need bf16/fp16), torch.compile (fuses
LayerNorm, GELU, dropout and the bias adds), a fused AdamW step (~200 parameter tensors),
and a larger batch. There is no convolution, so channels_last does not apply.

Needs transformers (`pip install -e '.[zoo]'`).

Environment (read when the file is imported): AUTOOPT_ZOO_SEQ_LEN, the sequence length in
tokens (default 128, at most 512); smaller values keep CPU runs and tests short.
"""
import os

import torch
from transformers import BertConfig, BertForSequenceClassification

BATCH_SIZE = 32
SEQ_LEN = int(os.environ.get("AUTOOPT_ZOO_SEQ_LEN", "128"))
NUM_LABELS = 2
DATA_SEED = 70_000  # added to autoopt's seed: the data generator's seed


def build_model():
    return BertForSequenceClassification(BertConfig(num_labels=NUM_LABELS))


def make_batch(batch_size: int) -> dict:
    vocab = BertConfig().vocab_size
    g = torch.Generator().manual_seed(DATA_SEED + torch.initial_seed() % (2**31))
    input_ids = torch.randint(1000, vocab, (batch_size, SEQ_LEN), generator=g)  # past BERT's special tokens
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": torch.randint(0, NUM_LABELS, (batch_size,), generator=g),
    }


def forward(model, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def build_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=2e-5)
