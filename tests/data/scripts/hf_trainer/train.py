"""Fine-tune a small GPT-2 language model with the Hugging Face Trainer.

The model is built from a config (random initialisation, nothing downloaded) and trained on
random token sequences, so the script runs offline in a few seconds on a CPU:

    python train.py --max-steps 20 --output-dir out
"""
import argparse

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


class RandomTokens(Dataset):
    """Random token sequences; the labels are the inputs (causal LM, the model shifts them)."""

    def __init__(self, n_samples, seq_len, vocab_size, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab_size, (n_samples, seq_len), generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids.clone()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--output-dir", default="hf_out")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()

    config = GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    train_dataset = RandomTokens(512, args.seq_len, config.vocab_size)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        optim="adamw_torch",
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset)
    result = trainer.train()
    print(f"final train loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
