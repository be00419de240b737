"""Fine-tuning a tiny BERT built from a config with the Hugging Face Trainer (a fixture for the
script patcher; not run by the tests)."""
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

config = BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, num_labels=2)
model = BertForSequenceClassification(config)
data = Dataset.from_dict({
    "input_ids": torch.randint(0, 512, (64, 24)).tolist(),
    "labels": torch.randint(0, 2, (64,)).tolist(),
})

training_args = TrainingArguments(
    output_dir="out",
    per_device_train_batch_size=8,
    num_train_epochs=1,
    fp16=False,  # no GPU here
    report_to=[],
)
trainer = Trainer(model=model, args=training_args, train_dataset=data)
trainer.train()
