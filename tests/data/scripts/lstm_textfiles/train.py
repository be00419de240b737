"""Word-level LSTM language model on plain text files.

--data names a directory holding train.txt, valid.txt and test.txt (whitespace-separated
words, one sentence a line). Training runs truncated backpropagation through time over
the training text laid out in --batch-size parallel streams.

    python train.py --data ./corpus --epochs 6 --cuda
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn


class Vocabulary:
    def __init__(self):
        self.index = {}
        self.words = []

    def add(self, word):
        if word not in self.index:
            self.index[word] = len(self.words)
            self.words.append(word)
        return self.index[word]

    def __len__(self):
        return len(self.words)


def read_corpus(path):
    vocab = Vocabulary()
    splits = {}
    for split in ("train", "valid", "test"):
        ids = []
        with open(os.path.join(path, f"{split}.txt"), encoding="utf8") as f:
            for line in f:
                ids.extend(vocab.add(word) for word in line.split() + ["<eos>"])
        splits[split] = torch.tensor(ids, dtype=torch.long)
    return vocab, splits


def into_streams(ids, streams, device):
    """Lay a 1-D token sequence out as a (length, streams) matrix, dropping the remainder."""
    length = ids.size(0) // streams
    return ids[:length * streams].view(streams, length).t().contiguous().to(device)


class RNNModel(nn.Module):
    def __init__(self, vocab_size, emsize, nhid, nlayers, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emsize)
        self.rnn = nn.LSTM(emsize, nhid, nlayers, dropout=dropout if nlayers > 1 else 0.0)
        self.decoder = nn.Linear(nhid, vocab_size)
        self.nlayers, self.nhid = nlayers, nhid
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden

    def initial_state(self, streams):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, streams, self.nhid),
                weight.new_zeros(self.nlayers, streams, self.nhid))


def detach(hidden):
    """Cut the graph between windows so backpropagation stops at the window's start."""
    return tuple(h.detach() for h in hidden)


def window(source, i, bptt):
    length = min(bptt, len(source) - 1 - i)
    return source[i:i + length], source[i + 1:i + 1 + length].reshape(-1)


def evaluate(model, source, bptt, criterion, streams):
    model.eval()
    total, hidden = 0.0, model.initial_state(streams)
    with torch.no_grad():
        for i in range(0, source.size(0) - 1, bptt):
            inputs, targets = window(source, i, bptt)
            output, hidden = model(inputs, hidden)
            total += len(inputs) * criterion(output.view(-1, output.size(-1)), targets).item()
    model.train()
    return total / (len(source) - 1)


def main():
    parser = argparse.ArgumentParser(description="LSTM language model")
    parser.add_argument("--data", default="./data", help="directory with train.txt, valid.txt, test.txt")
    parser.add_argument("--emsize", type=int, default=64)
    parser.add_argument("--nhid", type=int, default=64)
    parser.add_argument("--nlayers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--bptt", type=int, default=24)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1111)
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--save", default="model.pt")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.cuda else "cpu")
    vocab, splits = read_corpus(args.data)
    train = into_streams(splits["train"], args.batch_size, device)
    valid = into_streams(splits["valid"], 10, device)
    test = into_streams(splits["test"], 10, device)
    print(f"vocabulary {len(vocab)}, {len(splits['train'])} training tokens")

    model = RNNModel(len(vocab), args.emsize, args.nhid, args.nlayers, args.dropout).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    best_val = None
    for epoch in range(1, args.epochs + 1):
        started = time.time()
        total_loss, hidden = 0.0, model.initial_state(args.batch_size)
        for batch, i in enumerate(range(0, train.size(0) - 1, args.bptt)):
            inputs, targets = window(train, i, args.bptt)
            hidden = detach(hidden)
            optimizer.zero_grad()
            output, hidden = model(inputs, hidden)
            loss = criterion(output.view(-1, len(vocab)), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()

            total_loss += loss.item()
            if batch % args.log_interval == 0 and batch > 0:
                current = total_loss / args.log_interval
                elapsed = (time.time() - started) * 1000 / args.log_interval
                print(f"| epoch {epoch:3d} | batch {batch:5d} | {elapsed:6.1f} ms/batch | "
                      f"loss {current:5.2f} | ppl {math.exp(current):8.2f}")
                total_loss, started = 0.0, time.time()

        val_loss = evaluate(model, valid, args.bptt, criterion, 10)
        print(f"| end of epoch {epoch:3d} | valid loss {val_loss:5.2f} | valid ppl {math.exp(val_loss):8.2f}")
        if best_val is None or val_loss < best_val:
            with open(args.save, "wb") as f:
                torch.save(model.state_dict(), f)
            best_val = val_loss
        else:
            for group in optimizer.param_groups:
                group["lr"] /= 2.0

    model.load_state_dict(torch.load(args.save))
    test_loss = evaluate(model, test, args.bptt, criterion, 10)
    print(f"| end of training | test loss {test_loss:5.2f} | test ppl {math.exp(test_loss):8.2f}")


if __name__ == "__main__":
    main()
