"""A four-conv network with one residual add: small enough for engine tests in seconds.

    stem 3x3 (c0) -> down 3x3 stride 2 (c1) -> [conv_a 3x3 (c2) -> conv_b 3x3 (c1, no act)] + skip
    -> ReLU -> global average pool -> linear

``conv_a``'s width is free to prune; ``down`` and ``conv_b`` are coupled by the residual add,
which is the case a pruner's dependency handling has to get right.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from host.models.layers import ConvBNAct, init_weights
from host.models.layers import validate_channels as _validate_channels

__all__ = ["TinyCNN"]


class TinyCNN(nn.Module):
    """Four Conv-BN(-ReLU) layers, one residual add, pool and linear classifier.

    Args:
        num_classes: Classifier outputs.
        in_channels: Input image channels.
        input_size: Accepted for a uniform model signature; the network works at any size >= 2.
        channels: Widths ``(c0, c1, c2)``: stem, downsampling conv (= residual width), inner conv.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        channels: Sequence[int] = (8, 16, 16),
    ) -> None:
        super().__init__()
        del input_size  # global pooling makes the network size-agnostic
        c0, c1, c2 = _validate_channels(channels, 3, "TinyCNN")
        self.stem = ConvBNAct(in_channels, c0, 3, 1)
        self.down = ConvBNAct(c0, c1, 3, 2)
        self.conv_a = ConvBNAct(c1, c2, 3, 1)
        self.conv_b = ConvBNAct(c2, c1, 3, 1, act="none")
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c1, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))  # (N, c1, H/2, W/2)
        x = self.act(x + self.conv_b(self.conv_a(x)))  # residual add
        return self.classifier(torch.flatten(self.pool(x), 1))  # (N, num_classes)

    def channel_config(self) -> list[int]:
        """``[c0, c1, c2]`` as the modules currently are (after any pruning)."""
        return [self.stem.out_channels, self.down.out_channels, self.conv_a.out_channels]
