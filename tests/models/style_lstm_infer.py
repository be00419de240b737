"""An LSTM sentiment classifier in inference mode, in a different style from
examples/lstm_classifier.py: sequence-first tensors (batch_first=False), packed
variable-length sequences, the last hidden states of both directions, a tuple batch
(tokens (T, B), lengths (B,)) and an explicit forward(model, batch)."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

BATCH_SIZE = 24
MAX_LEN = 40
VOCAB_SIZE = 1500


class SentimentLSTM(nn.Module):
    def __init__(self, vocab_size=VOCAB_SIZE, embedding_dim=48, hidden_dim=64, n_classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=0)
        self.rnn = nn.LSTM(embedding_dim, hidden_dim, num_layers=1, bidirectional=True)
        self.fc = nn.Linear(hidden_dim * 2, n_classes)
        self.dropout = nn.Dropout(0.3)

    def forward(self, text, text_lengths):
        embedded = self.dropout(self.embedding(text))
        packed = pack_padded_sequence(embedded, text_lengths.cpu(), enforce_sorted=False)
        _, (hidden, _) = self.rnn(packed)
        hidden = self.dropout(torch.cat((hidden[-2, :, :], hidden[-1, :, :]), dim=1))
        return self.fc(hidden)


def build_model():
    return SentimentLSTM()


def make_batch(batch_size):
    lengths = torch.randint(5, MAX_LEN + 1, (batch_size,))
    text = torch.randint(1, VOCAB_SIZE, (MAX_LEN, batch_size))
    text = text * (torch.arange(MAX_LEN).unsqueeze(1) < lengths.unsqueeze(0))  # pad with 0
    return text, lengths


def forward(model, batch):
    text, lengths = batch
    return model(text, lengths)
