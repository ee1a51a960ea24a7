"""MobileNetV1 (Howard et al., 2017) in plain PyTorch.

Stem Conv-BN-ReLU, 13 depthwise-separable blocks (depthwise 3x3 Conv-BN-ReLU, pointwise 1x1
Conv-BN-ReLU), global average pool, dropout, linear classifier.

A network is fully described by 14 output-channel counts (stem, then the pointwise conv of each
block), so a pruned network can be rebuilt with ``MobileNetV1(channels=pruned.channel_config())``
and its state dict loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from host.models.layers import ConvBNAct, default_first_stride, init_weights, make_divisible
from host.models.layers import validate_channels as _validate_channels

__all__ = ["MobileNetV1", "DepthwiseSeparable", "V1_BLOCKS", "V1_STEM_CHANNELS"]

logger = logging.getLogger(__name__)

V1_STEM_CHANNELS = 32
# (pointwise output channels, depthwise stride) of the 13 blocks, width multiplier 1.0.
V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 Conv-BN-ReLU followed by pointwise 1x1 Conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pointwise = ConvBNAct(in_channels, out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 with width multiplier or explicit channels.

    Args:
        num_classes: Classifier outputs.
        width_mult: Scales every layer's channels (rounded to multiples of 8). Ignored when
            ``channels`` is given.
        in_channels: Input image channels (1 for MNIST, 3 for RGB).
        input_size: Input side length; only used to choose the default stem stride.
        first_stride: Stem stride; ``None`` picks 1 for small inputs (< 64 px), 2 otherwise.
        channels: Explicit output channels, 14 entries: stem, then each block's pointwise conv.
        dropout: Dropout probability before the classifier.

    Raises:
        ValueError: If ``channels`` has the wrong length or non-positive entries, or
            ``width_mult`` is not positive.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width_mult: float = 1.0,
        in_channels: int = 1,
        input_size: int = 28,
        first_stride: int | None = None,
        channels: Sequence[int] | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if channels is None:
            if width_mult <= 0:
                raise ValueError(f"MobileNetV1: width_mult must be positive, got {width_mult}")
            chans = [make_divisible(V1_STEM_CHANNELS * width_mult)]
            chans += [make_divisible(c * width_mult) for c, _ in V1_BLOCKS]
        else:
            chans = _validate_channels(channels, 1 + len(V1_BLOCKS), "MobileNetV1")
        stride = default_first_stride(input_size) if first_stride is None else first_stride

        layers: list[nn.Module] = [ConvBNAct(in_channels, chans[0], 3, stride)]
        for (_, block_stride), c_in, c_out in zip(V1_BLOCKS, chans[:-1], chans[1:], strict=True):
            layers.append(DepthwiseSeparable(c_in, c_out, block_stride))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(chans[-1], num_classes)
        init_weights(self)
        logger.debug("MobileNetV1 channels=%s stem_stride=%d", chans, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C_last, H', W')
        x = torch.flatten(self.pool(x), 1)  # (N, C_last)
        return self.classifier(self.dropout(x))  # (N, num_classes)

    def channel_config(self) -> list[int]:
        """The 14 output-channel counts as the modules currently are (after any pruning)."""
        stem = self.features[0]
        assert isinstance(stem, ConvBNAct)
        chans = [stem.out_channels]
        for block in list(self.features)[1:]:
            assert isinstance(block, DepthwiseSeparable)
            chans.append(block.pointwise.out_channels)
        return chans
