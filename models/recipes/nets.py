"""The two zoo architectures (input: (N, 1, 28, 28) float32, already normalized)."""

import torch
from torch import nn


def conv_bn_relu(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class PlainCNN(nn.Module):
    """3 Conv-BN-ReLU blocks (32/64/128 channels) with max pooling, then one Linear layer."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.block1 = nn.Sequential(*conv_bn_relu(1, 32), nn.MaxPool2d(2))  # 28 -> 14
        self.block2 = nn.Sequential(*conv_bn_relu(32, 64), nn.MaxPool2d(2))  # 14 -> 7
        # padding 1 so the 7x7 map pools to 4x4 and the border rows/columns (where patch triggers sit) survive
        self.block3 = nn.Sequential(*conv_bn_relu(64, 128), nn.MaxPool2d(2, 2, padding=1))  # 7 -> 4
        self.head = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(x)))
        return self.head(torch.flatten(x, 1))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + skip (identity or 1x1 conv-bn projection), then relu."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return torch.relu(out + skip)


class SmallResNet(nn.Module):
    """Stem conv-bn-relu (16), blocks 16 -> 32 (stride 2) -> 64 (stride 2), global average pool, Linear."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn_relu(1, width))
        self.layer1 = BasicBlock(width, width, 1)  # 28x28
        self.layer2 = BasicBlock(width, 2 * width, 2)  # 14x14, 1x1 projection
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)  # 7x7, 1x1 projection
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(torch.flatten(self.pool(x), 1))


ARCHITECTURES = {"cnn": PlainCNN, "resnet": SmallResNet}
