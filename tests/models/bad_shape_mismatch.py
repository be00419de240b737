"""LeNet written for 3x32x32 images (16*5*5 = 400 features after the convolutions),
fed 1x28x28 MNIST-sized images from make_batch after changing the first conv: the
flattened features are 16*4*4 = 256, and fc1 expects 400."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def build_model():
    return LeNet()


def make_batch(batch_size):
    return torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))


def forward(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def build_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
