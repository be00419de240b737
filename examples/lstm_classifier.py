"""An LSTM text classifier, inference only (no build_optimizer: autoopt profiles forward
passes under torch.no_grad()).

Token ids -> embedding -> 2-layer bidirectional LSTM -> mean-pool over time -> linear.
Batches are a dict of token ids and a padding mask, passed to the model as keyword
arguments by the default forward (model(**batch)).
"""
import torch
import torch.nn as nn

BATCH_SIZE = 32
VOCAB = 2000
SEQ_LEN = 32
NUM_CLASSES = 4


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = VOCAB, embed: int = 64, hidden: int = 64, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(tokens))
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


def build_model() -> nn.Module:
    return LSTMClassifier()


def make_batch(batch_size: int) -> dict:
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (batch_size,))
    mask = torch.arange(SEQ_LEN).unsqueeze(0) < lengths.unsqueeze(1)
    tokens = torch.randint(1, VOCAB, (batch_size, SEQ_LEN)) * mask  # 0 = padding
    return {"tokens": tokens, "mask": mask}
