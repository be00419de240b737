"""SimpleNet: a small LeNet-style CNN for 3x32x32 images, trained with SGD + momentum.

The bundled default model file for `autoopt optimize`. It follows the model-file
contract (docs/contracts.md): build_model, make_batch, forward (returns the loss) and
build_optimizer. The data is synthetic and deterministic under torch.manual_seed
(no downloads): each of the 10 classes has its own fixed image pattern, and a batch
is those patterns plus noise, so the model can actually learn.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32
NUM_CLASSES = 10


class SimpleNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, kernel_size=3, padding=1),  # 32x32
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 128, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),  # logits: CrossEntropyLoss applies log-softmax itself
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model() -> nn.Module:
    return SimpleNet()


def _class_patterns() -> torch.Tensor:
    # fixed per-class patterns, independent of the global seed
    g = torch.Generator().manual_seed(1234)
    return torch.randn(NUM_CLASSES, 3, 32, 32, generator=g)


def make_batch(batch_size: int):
    labels = torch.randint(0, NUM_CLASSES, (batch_size,))
    images = _class_patterns()[labels] + torch.randn(batch_size, 3, 32, 32)
    return images, labels


def forward(model: nn.Module, batch) -> torch.Tensor:
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels)


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build_model()
    opt = build_optimizer(model)
    for step in range(20):
        loss = forward(model, make_batch(BATCH_SIZE))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0:
            print(f"step {step:2d}  loss {loss.item():.4f}")
