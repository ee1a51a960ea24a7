"""User-model factories for registry tests, importable as ``tests.helpers_models:<name>``."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConstantClassifier", "make_net", "make_net_fixed", "not_a_module"]


def make_net(num_classes: int = 10, in_channels: int = 1, width: int = 4) -> nn.Module:
    """A small conv net; takes ``num_classes``/``in_channels`` but not ``input_size``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def make_net_fixed() -> nn.Module:
    """A factory that takes no arguments at all."""
    return make_net()


def not_a_module(**kwargs: object) -> str:
    """A factory that wrongly returns something other than a module."""
    return "not a model"


class ConstantClassifier(nn.Module):
    """Always predicts ``label``: its accuracy is that class's share of the data."""

    def __init__(self, label: int, num_classes: int = 10) -> None:
        super().__init__()
        self.label = label
        self.num_classes = num_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.num_classes, device=x.device)
        logits[:, self.label] = 1.0
        return logits + 0.0 * self.dummy
