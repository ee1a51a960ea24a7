"""MobileNetV2 (Sandler et al., 2018) in plain PyTorch.

Stem Conv-BN-ReLU6, 17 inverted-residual blocks (1x1 expansion Conv-BN-ReLU6, depthwise 3x3
Conv-BN-ReLU6, linear 1x1 projection Conv-BN, residual add when the block keeps its shape),
a 1x1 Conv-BN-ReLU6 head, global average pool, dropout and a linear classifier.

Explicit channels are a flat list of 36 ints so a pruned network can be rebuilt from its config:
``[stem, hidden_1, out_1, ..., hidden_17, out_17, head]``. ``hidden_i`` is the width of the
expansion (and depthwise) conv; for the first block, which has no expansion conv, it must equal
the stem width. Blocks 2..n of each stage have a residual add, so their input and output widths
must be equal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from host.models.layers import ConvBNAct, default_first_stride, init_weights, make_divisible
from host.models.layers import validate_channels as _validate_channels

__all__ = ["MobileNetV2", "InvertedResidual", "V2BlockSpec", "V2_SETTINGS", "v2_block_specs"]

logger = logging.getLogger(__name__)

V2_STEM_CHANNELS = 32
V2_HEAD_CHANNELS = 1280
# (expansion t, output channels c, repeats n, first stride s) per stage, width multiplier 1.0.
V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


@dataclass(frozen=True)
class V2BlockSpec:
    """Structure of one inverted-residual block (fixed by the architecture, not by widths)."""

    expand_ratio: int  # 1: no expansion conv
    out_channels: int  # at width multiplier 1.0
    stride: int
    residual: bool  # not the first block of its stage


def v2_block_specs() -> list[V2BlockSpec]:
    """The 17 blocks of MobileNetV2, in order."""
    specs = []
    for t, c, n, s in V2_SETTINGS:
        for i in range(n):
            specs.append(V2BlockSpec(t, c, s if i == 0 else 1, residual=i > 0))
    return specs


class InvertedResidual(nn.Module):
    """Expansion 1x1 (optional) -> depthwise 3x3 -> linear projection 1x1, plus skip if shaped."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        out_channels: int,
        stride: int,
        expand: bool,
        residual: bool,
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                "InvertedResidual: a residual block needs stride 1 and in == out channels, got "
                f"stride={stride}, in={in_channels}, out={out_channels}"
            )
        if not expand and hidden_channels != in_channels:
            raise ValueError(
                "InvertedResidual: without an expansion conv the hidden width must equal the "
                f"input width, got hidden={hidden_channels}, in={in_channels}"
            )
        self.use_residual = residual
        self.expand: ConvBNAct | None = (
            ConvBNAct(in_channels, hidden_channels, 1, 1, act="relu6") if expand else None
        )
        self.depthwise = ConvBNAct(
            hidden_channels, hidden_channels, 3, stride, groups=hidden_channels, act="relu6"
        )
        self.project = ConvBNAct(hidden_channels, out_channels, 1, 1, act="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else self.expand(x)
        y = self.project(self.depthwise(y))
        return x + y if self.use_residual else y

    @property
    def hidden_channels(self) -> int:
        return self.depthwise.out_channels

    @property
    def out_channels(self) -> int:
        return self.project.out_channels


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier or explicit channels.

    Args:
        num_classes: Classifier outputs.
        width_mult: Scales every layer's channels (rounded to multiples of 8); the 1280-channel
            head is only ever widened, as in the paper. Ignored when ``channels`` is given.
        in_channels: Input image channels.
        input_size: Input side length; only used to choose the default stem stride.
        first_stride: Stem stride; ``None`` picks 1 for small inputs (< 64 px), 2 otherwise.
        channels: Explicit widths, 36 entries (see the module docstring).
        dropout: Dropout probability before the classifier.

    Raises:
        ValueError: On a malformed ``channels`` list or non-positive ``width_mult``.
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
        specs = v2_block_specs()
        if channels is None:
            if width_mult <= 0:
                raise ValueError(f"MobileNetV2: width_mult must be positive, got {width_mult}")
            chans = _width_mult_channels(specs, width_mult)
        else:
            chans = _validate_channels(channels, 2 + 2 * len(specs), "MobileNetV2")
        stride = default_first_stride(input_size) if first_stride is None else first_stride

        layers: list[nn.Module] = [ConvBNAct(in_channels, chans[0], 3, stride, act="relu6")]
        c_in = chans[0]
        for i, spec in enumerate(specs):
            hidden, c_out = chans[1 + 2 * i], chans[2 + 2 * i]
            try:
                block = InvertedResidual(
                    c_in, hidden, c_out, spec.stride, spec.expand_ratio != 1, spec.residual
                )
            except ValueError as err:
                raise ValueError(f"MobileNetV2 block {i + 1}: {err}") from None
            layers.append(block)
            c_in = c_out
        layers.append(ConvBNAct(c_in, chans[-1], 1, 1, act="relu6"))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(chans[-1], num_classes)
        init_weights(self)
        logger.debug("MobileNetV2 channels=%s stem_stride=%d", chans, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, C_head, H', W')
        x = torch.flatten(self.pool(x), 1)  # (N, C_head)
        return self.classifier(self.dropout(x))  # (N, num_classes)

    def channel_config(self) -> list[int]:
        """The 36 widths as the modules currently are (after any pruning)."""
        modules = list(self.features)
        stem, head = modules[0], modules[-1]
        assert isinstance(stem, ConvBNAct) and isinstance(head, ConvBNAct)
        chans = [stem.out_channels]
        for block in modules[1:-1]:
            assert isinstance(block, InvertedResidual)
            chans += [block.hidden_channels, block.out_channels]
        chans.append(head.out_channels)
        return chans


def _width_mult_channels(specs: Sequence[V2BlockSpec], width_mult: float) -> list[int]:
    stem = make_divisible(V2_STEM_CHANNELS * width_mult)
    chans = [stem]
    c_in = stem
    for spec in specs:
        c_out = make_divisible(spec.out_channels * width_mult)
        # The expansion width follows the (rounded) input width, as in the reference code.
        chans += [c_in * spec.expand_ratio, c_out]
        c_in = c_out
    chans.append(make_divisible(V2_HEAD_CHANNELS * max(1.0, width_mult)))
    return chans
