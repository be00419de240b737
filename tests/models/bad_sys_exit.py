"""A training script, not a model file: it parses arguments and exits at import."""
import argparse
import sys

import torch
import torch.nn as nn


def build_model():
    return nn.Linear(10, 2)


def make_batch(batch_size):
    return torch.randn(batch_size, 10)


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.parse_args(argv)
    return 0


sys.exit(main([]))
