"""Layer specs: validation messages, derived shapes and canonical keys (pure Python)."""

from __future__ import annotations

import pytest

from device_server import wire
from device_server.errors import InvalidConfigError
from device_server.spec import Activation, LayerSpec, NodeOperand, OpKind, SessionSpec


def test_conv_shapes_and_key_are_canonical() -> None:
    a = LayerSpec.create("conv2d", (1, 32, 56, 56), out_channels=64, kernel=3, stride=2, padding=1)
    b = LayerSpec.create(OpKind.CONV2D, [1, 32, 56, 56], out_channels=64, kernel=(3, 3),
                         stride=(2, 2), padding=(1, 1))
    assert a == b and a.key() == b.key()
    assert a.output_shape() == (1, 64, 28, 28)
    assert a.macs() == 64 * 28 * 28 * 32 * 9


def test_depthwise_and_roundtrip_through_proto() -> None:
    spec = LayerSpec.create("conv2d", (1, 24, 14, 14), out_channels=24, kernel=3, padding=1,
                            groups=24, batch_norm=True, activation="hardswish")
    assert spec.describe().startswith("dwconv3x3")
    assert wire.layer_from_proto(wire.layer_to_proto(spec)) == spec
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert spec.activation is Activation.HARDSWISH


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"op": "conv2d", "input_shape": (1, 3, 0, 8), "out_channels": 8}, "positive"),
        ({"op": "conv2d", "input_shape": (1, 3, 8, 8), "out_channels": 0}, "out_channels > 0"),
        ({"op": "conv2d", "input_shape": (1, 6, 8, 8), "out_channels": 8, "groups": 4},
         "divisible by groups"),
        ({"op": "conv2d", "input_shape": (1, 3, 4, 4), "out_channels": 8, "kernel": 7},
         "larger than the padded input"),
        ({"op": "conv2d", "input_shape": (1, 3, 8), "out_channels": 8}, "(N, C, H, W)"),
        ({"op": "softmax", "input_shape": (1, 3, 8, 8)}, "unknown op kind"),
        ({"op": "conv2d", "input_shape": (1, 3, 8, 8), "out_channels": 3, "activation": "gelu"},
         "unknown activation"),
        ({"op": "linear", "input_shape": (1, 8), "out_channels": 8, "residual": True},
         "residual applies to conv2d only"),
        ({"op": "linear", "input_shape": (1, 3, 8, 8), "out_channels": 8}, "(N, C)"),
    ],
)
def test_bad_specs_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LayerSpec.create(**kwargs)  # type: ignore[arg-type]


def test_specs_are_built_by_keyword_only() -> None:
    """A field added to a spec later cannot silently shift the others: nothing past a unit's
    op and input shape is taken by position."""
    with pytest.raises(TypeError):
        LayerSpec.create("conv2d", (1, 8, 8, 8), 8)  # type: ignore[misc]
    with pytest.raises(TypeError):
        LayerSpec(OpKind.CONV2D, (1, 8, 8, 8))  # type: ignore[misc]
    with pytest.raises(TypeError):
        NodeOperand("input", (1, 8))  # type: ignore[misc]
    with pytest.raises(TypeError):
        SessionSpec("CPUExecutionProvider")  # type: ignore[misc]
    spec = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=3)
    assert wire.layer_from_proto(wire.layer_to_proto(spec)) == spec
