"""A recurrent text classifier fed by a DataLoader that tokenizes text per sample.

The workload: the classic RNN text-classification job (news topics, sentiment) where the
input pipeline is part of the cost: Embedding(20000, 256), a 2-layer bidirectional GRU
(hidden 512 per direction), masked mean pooling over the tokens and a linear head over 4
classes, trained with Adam at lr 1e-3. build_dataloader() returns a torch DataLoader
(num_workers=0, shuffled with a seeded generator, drop_last) over a map-style Dataset
whose __getitem__ does real per-sample work in Python: it writes a synthetic sentence
(a random length, words drawn from a fixed vocabulary of made-up words), lower-cases and
splits it, hashes each word to an id (crc32 into 20000 buckets; 0 is padding) and pads or
truncates to a fixed length. make_batch() builds the same kind of batch directly (autoopt
uses it to verify numerics on identical batches).

The data is synthetic (no download) but learnable: the label is what a fixed random
teacher says about the bag of words (a fixed score per token id and class, summed over
the sentence's tokens; the arg-max is the class), so the loss falls as the model learns
which words point to which class.

What autoopt's transforms are expected to do on a GPU: DataLoader workers (and pinned
memory, non-blocking copies): with num_workers=0 the GPU waits while the main process
tokenizes every batch; bf16 autocast (cuDNN's GRU and the head run in bf16), a fused Adam
step, and a larger batch. torch.compile does little for cuDNN's fused RNN kernel, and
channels_last and SDPA do not apply.

Environment (read when the file is imported): AUTOOPT_ZOO_SEQ_LEN, the padded sequence
length in tokens (default 128); smaller values keep CPU runs and tests short.
"""
import os
import random
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

BATCH_SIZE = 64
SEQ_LEN = int(os.environ.get("AUTOOPT_ZOO_SEQ_LEN", "128"))
VOCAB = 20000  # hash buckets; id 0 is padding
EMBED = 256
HIDDEN = 512
NUM_CLASSES = 4
WORDS = 8000  # made-up words the sentences are written with
DATASET_SIZE = 16384
DATA_SEED = 90_000

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "qu", "ra", "xi", "bel", "tor")
_cache: dict = {}


def _vocabulary() -> list:
    """A fixed list of made-up words (2-4 syllables, some capitalised)."""
    if "words" not in _cache:
        rng = random.Random(1234)
        words = set()
        while len(words) < WORDS:
            w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
            words.add(w.capitalize() if rng.random() < 0.1 else w)
        _cache["words"] = sorted(words)
    return _cache["words"]


def _teacher() -> torch.Tensor:
    """A fixed random score per (token id, class)."""
    if "teacher" not in _cache:
        g = torch.Generator().manual_seed(4321)
        _cache["teacher"] = torch.randn(VOCAB, NUM_CLASSES, generator=g)
    return _cache["teacher"]


def tokenize(text: str, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Words to ids by hashing (lower-cased, punctuation stripped), padded / truncated to seq_len."""
    ids = [zlib.crc32(w.strip(".,;!?").lower().encode()) % (VOCAB - 1) + 1 for w in text.split()]
    ids = ids[:seq_len] + [0] * max(0, seq_len - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def sentence(seed: int) -> str:
    """The synthetic sentence number `seed`: 8 to 2 x SEQ_LEN words with some punctuation."""
    rng = random.Random(DATA_SEED + seed)
    words = _vocabulary()
    n = rng.randint(8, 2 * SEQ_LEN)
    out = [rng.choice(words) for _ in range(n)]
    for _ in range(rng.randint(0, n // 8)):
        j = rng.randrange(n)
        out[j] += rng.choice(".,;!?")
    return " ".join(out)


def sample(seed: int) -> tuple:
    """(token ids of SEQ_LEN, label) of sentence number `seed`."""
    tokens = tokenize(sentence(seed))
    label = _teacher()[tokens[tokens > 0]].sum(0).argmax()
    return tokens, label


class SentenceDataset(Dataset):
    """A map-style dataset: each item is a sentence written, tokenized and labelled on access."""

    def __init__(self, size: int = DATASET_SIZE):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple:
        return sample(index)


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED, padding_idx=0)
        self.gru = nn.GRU(EMBED, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * HIDDEN, NUM_CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))  # (N, T, 2H)
        mask = (tokens > 0).unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


def build_model() -> nn.Module:
    return GRUClassifier()


def make_batch(batch_size: int):
    """batch_size samples of the dataset, picked with the global RNG (seeded by autoopt)."""
    seeds = torch.randint(0, 2**31 - 1 - DATA_SEED, (batch_size,)).tolist()
    tokens, labels = zip(*(sample(s) for s in seeds))
    return torch.stack(tokens), torch.stack(labels)


def forward(model: nn.Module, batch) -> torch.Tensor:
    tokens, labels = batch
    return F.cross_entropy(model(tokens), labels)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def build_dataloader(batch_size: int) -> DataLoader:
    return DataLoader(SentenceDataset(), batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0,
                      generator=torch.Generator().manual_seed(7))
