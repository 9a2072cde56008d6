"""The papers' networks: LeNet (MNIST), ResNet-18, WRN-28-10 / WRN-16-4 and All-CNN (CIFAR).

- LeNet: Parle (Chaudhari et al., 2017), Section 4.2 — conv 20 and 50 channels, fc 500, ReLU,
  batch norm, dropout 0.25 after every conv and fc layer.
- Wide residual networks: Zagoruyko & Komodakis, "Wide Residual Networks" (2016); WRN-28-10
  (dropout 0.3) is Parle's CIFAR network, WRN-16-4 (dropout 0.4) its SVHN one.
- ResNet-18: He et al. (2016), the usual CIFAR variant (3x3 stem, no max-pool); used by the
  DPSGD and ADPSGD papers' CIFAR experiments among others.
- All-CNN-C: Springenberg et al., "Striving for Simplicity" (2014), Parle Section 5; batch norm
  after each convolution as in Parle's reference code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class LeNet(nn.Module):
    """LeNet as in Parle, Section 4.2 (28x28 inputs).

    Args:
        in_channels: image channels.
        num_classes: outputs.
        width: multiplies the channel and hidden sizes (1.0 = the paper's 20/50/500).
        dropout: after every conv and fc block (the paper: 0.25).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 dropout: float = 0.25) -> None:
        super().__init__()
        c1, c2, h = (max(1, round(v * width)) for v in (20, 50, 500))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.MaxPool2d(2), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(c1, c2, 5), nn.MaxPool2d(2), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * 4 * 4, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(h, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(x))  # a module call is typed Any
        return logits


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (3x3 stem, four stages of two basic blocks)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        w = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            for j in range(2):
                layers.append(_BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))
        return logits


class _WideBlock(nn.Module):
    """Pre-activation wide block (BN-ReLU-conv, dropout between the two convs)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # the projection shortcut reads the pre-activated input, as in the WRN reference code
        short: torch.Tensor = x if self.shortcut is None else self.shortcut(o)
        residual: torch.Tensor = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(o)))))
        return residual + short


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis, 2016): ``(depth - 4) / 6`` blocks per stage."""

    def __init__(self, depth: int = 28, widen: int = 10, dropout: float = 0.3, in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        blocks, cin = [], w[0]
        for stage, c in enumerate(w[1:]):
            for j in range(n):
                blocks.append(_WideBlock(cin, c, 2 if (stage > 0 and j == 0) else 1, dropout))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn(self.blocks(self.conv(x))))
        logits: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))
        return logits


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al., 2014): strided convs instead of pooling, 1x1 classifier.

    Dropout 0.2 on the input and 0.5 after each stride-2 layer as the original; batch norm after
    every convolution as in Parle's reference implementation.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        a, b = max(1, round(96 * width)), max(1, round(192 * width))

        def conv(ci: int, co: int, k: int, s: int = 1, p: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(ci, co, k, s, p, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

        self.net = nn.Sequential(
            nn.Dropout(0.2),
            *conv(in_channels, a, 3), *conv(a, a, 3), *conv(a, a, 3, 2), nn.Dropout(0.5),
            *conv(a, b, 3), *conv(b, b, 3), *conv(b, b, 3, 2), nn.Dropout(0.5),
            *conv(b, b, 3, 1, 0), *conv(b, b, 1, 1, 0), *conv(b, num_classes, 1, 1, 0),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)
        return logits


# name -> factory(in_channels, num_classes, width); the recipes choose among these by --model
MODELS: dict[str, Callable[[int, int, float], nn.Module]] = {
    "lenet": lambda c, k, w: LeNet(c, k, width=w),
    "resnet18": lambda c, k, w: ResNet18(c, k, width=w),
    "wrn-28-10": lambda c, k, w: WideResNet(28, max(1, round(10 * w)), 0.3, c, k),
    "wrn-16-4": lambda c, k, w: WideResNet(16, max(1, round(4 * w)), 0.4, c, k),
    "allcnn": lambda c, k, w: AllCNN(c, k, width=w),
}


def build_model(name: str, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](in_channels, num_classes, width)
