"""Building blocks shared by the plain-PyTorch models: channel rounding and Conv-BN-activation.

Children are named (``conv``, ``bn``, ``act``) rather than numbered so that pruning and
layer-extraction code can find them by name. Activations are not in-place, so forward hooks on a
BatchNorm see its real output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

from torch import nn

__all__ = [
    "Activation",
    "ConvBNAct",
    "SMALL_INPUT_MAX",
    "default_first_stride",
    "init_weights",
    "make_divisible",
    "validate_channels",
]

Activation = Literal["relu", "relu6", "none"]

# Inputs smaller than this (MNIST 28, CIFAR 32) keep full resolution in the stem; ImageNet-sized
# inputs (224) downsample by 2 there, as in the papers.
SMALL_INPUT_MAX = 64


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without losing more than 10 %.

    This is the rounding of the MobileNet / EfficientNet reference code, so width multipliers give
    the channel counts other implementations (and latency tables) expect.

    Args:
        value: The unrounded channel count (e.g. ``32 * width_mult``).
        divisor: The multiple to round to.
        min_value: Lower bound; defaults to ``divisor``.

    Returns:
        The rounded channel count.
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10 %
        new_value += divisor
    return new_value


def default_first_stride(input_size: int | Sequence[int]) -> int:
    """Stride of the stem convolution: 1 for small inputs (< ``SMALL_INPUT_MAX``), else 2."""
    side = input_size if isinstance(input_size, int) else min(input_size)
    return 1 if side < SMALL_INPUT_MAX else 2


def validate_channels(channels: Sequence[int], expected_len: int, model: str) -> list[int]:
    """Check an explicit per-layer channel list and return it as a list of ints.

    Raises:
        ValueError: If the length is wrong or an entry is not a positive integer.
    """
    result = list(channels)
    if len(result) != expected_len:
        raise ValueError(
            f"{model}: expected {expected_len} channel counts, got {len(result)}: {result}"
        )
    for i, c in enumerate(result):
        if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
            raise ValueError(f"{model}: channel count #{i} must be a positive int, got {c!r}")
    return result


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, with 'same' padding for odd kernels."""

    # Declared for type checkers; nn.Sequential serves them from its child modules.
    conv: nn.Conv2d
    bn: nn.BatchNorm2d

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Activation = "relu",
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            groups=groups,
            bias=False,
        )
        layers["bn"] = nn.BatchNorm2d(out_channels)
        if act == "relu":
            layers["act"] = nn.ReLU()
        elif act == "relu6":
            layers["act"] = nn.ReLU6()
        elif act != "none":
            raise ValueError(f"unknown activation {act!r}; expected 'relu', 'relu6' or 'none'")
        super().__init__(layers)

    @property
    def out_channels(self) -> int:
        """Output channels of the convolution (reflects pruning done in place)."""
        return int(self.conv.out_channels)


def init_weights(model: nn.Module) -> None:
    """Reference initialisation: Kaiming (fan-out) convs, unit BN, small-normal linear layers."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
