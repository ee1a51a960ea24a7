"""Networks NetAdapt adapts: MobileNetV1/V2, EfficientNet-Lite0, a tiny test net, user models."""

from host.models.efficientnet_lite import efficientnet_lite0, lite0_weights_path
from host.models.layers import make_divisible
from host.models.mobilenet_v1 import MobileNetV1
from host.models.mobilenet_v2 import MobileNetV2
from host.models.registry import (
    build_model,
    build_model_for,
    default_input_shape,
    is_builtin,
    list_models,
)
from host.models.tiny_cnn import TinyCNN

__all__ = [
    "MobileNetV1",
    "MobileNetV2",
    "TinyCNN",
    "build_model",
    "build_model_for",
    "default_input_shape",
    "efficientnet_lite0",
    "is_builtin",
    "lite0_weights_path",
    "list_models",
    "make_divisible",
]
