"""autoopt adapter, written for autoopt's tests (not part of Lightning): Lightning's demo language
model, `lightning.pytorch.demos.LightningTransformer` (imported from the installed package), as its
module defines it: `Transformer` with WikiText-2's 33278-token vocabulary (the default), its
training_step's loss (nll_loss of the model's log-probabilities against the targets) and its
configure_optimizers (SGD, learning rate 0.1). Batches are 16 sequences of 35 random token ids, the
demo dataset's block size, with the next token as target, as WikiText2.__getitem__ pairs them."""
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import LightningTransformer

BATCH_SIZE = 16
VOCAB = 33278
BLOCK = 35


def build_model():
    return LightningTransformer(vocab_size=VOCAB)


def make_batch(n):
    tokens = torch.randint(0, VOCAB, (n, BLOCK + 1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward(model, batch):
    inputs, target = batch
    return F.nll_loss(model(inputs, target), target.reshape(-1))


def build_optimizer(model):
    return model.configure_optimizers()
