"""The RGB zoo's architectures (input: (N, 3, 32, 32*cells) float32, already normalized).

Small versions of the usual CIFAR-scale backbones, sized for 2 CPU cores:

- ``preact``: pre-activation ResNet (BackdoorBench's PreAct-ResNet18 block: BN-ReLU before each conv, the
  shortcut taken after the first BN-ReLU when it projects), one block per stage instead of two, 3 stages.
- ``mobilenetv2``: inverted residuals (1x1 expand, 3x3 depthwise, 1x1 linear project; ReLU6), fewer stages,
  a stride-2 stem.
- ``vgg``: VGG with BatchNorm (conv3x3-BN-ReLU, max pooling), 5 convs.
- ``vit``: a small Vision Transformer: 4x4 patches, learned position embeddings, pre-norm blocks of
  multi-head self-attention and a GELU MLP, mean of the tokens, LayerNorm, Linear.

For images of several 32x32 cells (rgb100: 32x64, rgb1000: 32x96) the CNNs pool the last feature map to
(1, cells), one feature vector per cell, before the Linear head, so position (which item is where) is kept.
"""

import torch
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv (w) at 32x32, pre-activation blocks w -> 2w (stride 2) -> 4w (stride 2), BN-ReLU, pool, Linear."""

    def __init__(self, num_classes=10, cells=1, width=16, blocks=(1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(PreActBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d((1, cells))
        self.linear = nn.Linear(cin * cells, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(self.pool(out), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv 3x3 stride 2 (16), inverted residuals (t, c, n, s) below, 1x1 conv to 128, pool, Linear.

    32x32 -> 16x16 (stem) -> 8x8 -> 4x4. The stem has stride 2 (as ImageNet's MobileNetV2, unlike the
    CIFAR variants) because depthwise convolutions at 32x32 were too slow to train on 2 CPU cores.
    """

    CFG = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 2, 2), (4, 64, 2, 2))

    def __init__(self, num_classes=10, cells=1, last=128):
        super().__init__()
        layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6()]
        cin = 16
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((1, cells))
        self.classifier = nn.Linear(last * cells, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class VGG(nn.Module):
    """conv3x3-BN-ReLU stacks with 2x2 max pooling (CFG), pool to (1, cells), Linear."""

    CFG = (32, "M", 64, "M", 128, 128, "M", 128, "M")

    def __init__(self, num_classes=10, cells=1):
        super().__init__()
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(3 if cin == 3 else cin, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((1, cells))
        self.classifier = nn.Linear(cin * cells, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """4x4 patch embedding (Conv), learned position embeddings, pre-norm blocks, token mean, LayerNorm, Linear."""

    def __init__(self, num_classes=10, cells=1, dim=64, depth=4, heads=4, mlp=128, patch=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        tokens = (32 // patch) * (32 * cells // patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


ARCHITECTURES = {"preact": PreActResNet, "mobilenetv2": MobileNetV2, "vgg": VGG, "vit": ViT}


def build(arch, num_classes, cells, **kwargs):
    return ARCHITECTURES[arch](num_classes=num_classes, cells=cells, **kwargs)
