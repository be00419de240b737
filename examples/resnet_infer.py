"""A small ResNet-style CNN for 3x32x32 images, inference only.

Residual basic blocks with BatchNorm (in eval mode, as deployed), global average
pooling and a linear classifier. No build_optimizer: autoopt profiles forward passes
under torch.no_grad(), where channels_last and reduced precision usually pay off.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def _stage(c_in: int, c_out: int, blocks: int) -> nn.Sequential:
    down = nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())
    return nn.Sequential(down, *(BasicBlock(c_out) for _ in range(blocks)))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.stage1 = _stage(32, 32, 2)  # 16x16
        self.stage2 = _stage(32, 64, 2)  # 8x8
        self.stage3 = _stage(64, 128, 2)  # 4x4
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model() -> nn.Module:
    model = SmallResNet()
    # give BatchNorm non-trivial running statistics, as a trained network has
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def make_batch(batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, 32, 32)
