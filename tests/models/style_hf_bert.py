"""A Hugging Face transformers model fed dict batches: BertForSequenceClassification
with a tiny configuration built in code (no download), trained with AdamW. The batch is
a dict (input_ids, attention_mask, token_type_ids, labels) passed as model(**batch) by
the default forward; the loss is the output's .loss."""
import torch
from transformers import BertConfig, BertForSequenceClassification

BATCH_SIZE = 16
SEQ_LEN = 32
VOCAB = 1000
NUM_LABELS = 3


def build_model():
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def make_batch(batch_size):
    input_ids = torch.randint(1, VOCAB, (batch_size, SEQ_LEN))
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (batch_size,))
    attention_mask = (torch.arange(SEQ_LEN).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return {
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "labels": input_ids[:, 1] % NUM_LABELS,
    }


def build_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
