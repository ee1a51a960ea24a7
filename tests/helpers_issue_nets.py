"""Small networks of the shapes a new user brings (issue 14's table), importable as
``tests.helpers_issue_nets:<factory>`` for the CLI tests. Each factory takes the registry's data
arguments (``num_classes``, ``in_channels``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["lenet_constant_view", "input_residual", "aux_head_net", "frozen_features",
           "fire_net", "gelu_net"]


class LeNetConstantView(nn.Module):
    """LeNet whose classifier input is reshaped with a hard-coded constant."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 6, 12, 12) for 28x28
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (N, 16, 4, 4)
        x = x.view(-1, 256)  # the constant: 16 * 4 * 4
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def lenet_constant_view(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return LeNetConstantView(num_classes, in_channels)


class InputResidual(nn.Module):
    """A first block that adds the raw network input to a conv's output."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv_in(x)
        return self.head(self.conv(x))


def input_residual(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return InputResidual(num_classes, in_channels)


class AuxHeadNet(nn.Module):
    """Returns (logits, aux_logits) in training mode and logits in eval mode; the auxiliary
    head reads the middle of the network and runs only while training."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32),
                                 nn.ReLU())
        self.aux = nn.Sequential(nn.Conv2d(32, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(16, num_classes))
        self.top = nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(48, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.mid(self.stem(x))
        logits = self.head(self.top(x))
        if self.training:
            return logits, self.aux(x)
        return logits


def aux_head_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return AuxHeadNet(num_classes, in_channels)


def _small_features(in_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    )


class FrozenFeatures(nn.Module):
    """Feature layers frozen (requires_grad=False), classifier trainable."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = _small_features(in_channels)
        for p in self.features.parameters():
            p.requires_grad = False
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def frozen_features(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return FrozenFeatures(num_classes, in_channels)


class Fire(nn.Module):
    """SqueezeNet's fire module: a 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""

    def __init__(self, c_in: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], 1)


class FireNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU())
        self.fire1 = Fire(32, 16, 32)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.fire2 = Fire(64, 16, 32)
        self.classifier = nn.Sequential(nn.Conv2d(64, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fire2(self.pool(self.fire1(self.stem(x)))))


def fire_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return FireNet(num_classes, in_channels)


def gelu_net(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A net with an op NetAdapt has no unit for (GELU): refused by name."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.GELU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
