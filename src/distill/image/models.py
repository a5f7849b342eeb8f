"""Model registry: CIFAR variants of torchvision's ResNets plus a small configurable ResNet for CPU tests.

Teacher and student are names in the config; ``build_model(name, num_classes, **kwargs)`` builds one.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models import resnet18 as _tv_resnet18
from torchvision.models import resnet34 as _tv_resnet34

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def _cifar_stem(model: nn.Module) -> nn.Module:
    # 32x32 inputs: a 3x3 stride-1 stem and no max-pool instead of ImageNet's 7x7/2 + pool.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 10) -> nn.Module:
    return _cifar_stem(_tv_resnet18(weights=None, num_classes=num_classes))


@register_model("resnet34")
def resnet34(num_classes: int = 10) -> nn.Module:
    return _cifar_stem(_tv_resnet34(weights=None, num_classes=num_classes))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR ResNet with three stages of ``depth`` basic blocks at widths w, 2w, 4w."""

    def __init__(self, num_classes: int = 10, width: int = 16, depth: int = 1):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"resnet_small needs width >= 1 and depth >= 1, got width={width}, depth={depth}")
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(depth):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model("resnet_small")
def resnet_small(num_classes: int = 10, width: int = 16, depth: int = 1) -> nn.Module:
    return SmallResNet(num_classes=num_classes, width=width, depth=depth)


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_count(name: str, num_classes: int = 10, **kwargs) -> int:
    """Parameter count without allocating memory (built on the meta device)."""
    with torch.device("meta"):
        return count_parameters(build_model(name, num_classes, **kwargs))
