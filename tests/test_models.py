"""Model zoo and registry: forward shapes, width rounding, channel configs, user factories,
and the shipped EfficientNet-Lite0 ImageNet weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from host.models import (
    MobileNetV1,
    MobileNetV2,
    build_model,
    build_model_for,
    default_input_shape,
    efficientnet_lite0,
    list_models,
    lite0_weights_path,
    make_divisible,
)
from host.models.efficientnet_lite import load_lite0_imagenet_state_dict
from host.models.mobilenet_v2 import InvertedResidual


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("mobilenet_v1", {"width_mult": 0.25}, (1, 28, 28)),
        ("mobilenet_v2", {"width_mult": 0.35}, (1, 28, 28)),
        ("tiny_cnn", {}, (1, 28, 28)),
        ("efficientnet_lite0", {"input_size": 32, "in_channels": 3}, (3, 32, 32)),
        ("efficientnet_lite0", {"input_size": 28, "in_channels": 1}, (1, 28, 28)),
    ],
)
def test_builtin_forward_shapes(
    name: str, kwargs: dict[str, object], shape: tuple[int, int, int]
) -> None:
    model = build_model(name, num_classes=7, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_stem_stride_follows_input_size() -> None:
    assert MobileNetV1(input_size=28).features[0].conv.stride == (1, 1)
    assert MobileNetV1(input_size=224, width_mult=0.25).features[0].conv.stride == (2, 2)
    assert MobileNetV2(input_size=28, first_stride=2).features[0].conv.stride == (2, 2)
    assert tuple(efficientnet_lite0(input_size=28)._conv_stem.stride) == (1, 1)
    assert tuple(efficientnet_lite0(input_size=224)._conv_stem.stride) == (2, 2)


def test_make_divisible_reference_values() -> None:
    assert make_divisible(32 * 0.35) == 16  # rounding to 8 would lose > 10 %
    assert make_divisible(12) == 16
    assert make_divisible(20) == 24
    assert make_divisible(1280) == 1280
    assert make_divisible(3) == 8  # floor at the divisor


@pytest.mark.parametrize("cls", [MobileNetV1, MobileNetV2])
@pytest.mark.parametrize("width_mult", [0.25, 0.35, 0.5, 0.75, 1.3])
def test_width_multiplier_gives_multiples_of_8(cls: type[nn.Module], width_mult: float) -> None:
    model = cls(width_mult=width_mult)
    outs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert outs and all(c % 8 == 0 for c in outs), outs


def test_mobilenet_v1_channel_config_round_trip() -> None:
    base = MobileNetV1(width_mult=0.5)
    config = base.channel_config()
    assert len(config) == 14 and config[0] == 16 and config[-1] == 512
    rebuilt = MobileNetV1(channels=config)
    rebuilt.load_state_dict(base.state_dict())  # same structure, strict
    pruned = [5, 9, 11, 20, 17, 30, 33, 31, 30, 29, 28, 40, 41, 3]  # any widths, not only x8
    model = MobileNetV1(channels=pruned, num_classes=4).eval()
    assert model.channel_config() == pruned
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 4)


def test_mobilenet_v2_structure_and_channel_config() -> None:
    base = MobileNetV2(width_mult=0.5)
    blocks = [m for m in base.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    assert sum(b.use_residual for b in blocks) == 10  # 17 blocks in 7 stages
    assert blocks[0].expand is None and all(b.expand is not None for b in blocks[1:])
    config = base.channel_config()
    assert len(config) == 36 and config[-1] == 1280
    MobileNetV2(channels=config).load_state_dict(base.state_dict())

    pruned = list(config)
    pruned[3] = 40  # block 2's expansion width: free to change
    model = MobileNetV2(channels=pruned).eval()
    assert model.channel_config() == pruned
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_channel_config_errors() -> None:
    with pytest.raises(ValueError, match="expected 14 channel counts"):
        MobileNetV1(channels=[8] * 13)
    with pytest.raises(ValueError, match="positive int"):
        MobileNetV1(channels=[8] * 13 + [0])
    config = MobileNetV2(width_mult=0.5).channel_config()
    config[6] += 8  # block 3's output; block 3 has a residual add, so it must equal its input
    with pytest.raises(ValueError, match="block 3: .*residual"):
        MobileNetV2(channels=config)
    config = MobileNetV2(width_mult=0.5).channel_config()
    config[1] = 8  # block 1 has no expansion: hidden must equal the stem width
    with pytest.raises(ValueError, match="block 1: .*expansion"):
        MobileNetV2(channels=config)


def test_registry_lists_builtins_and_rejects_unknown() -> None:
    assert list_models() == ["efficientnet_lite0", "mobilenet_v1", "mobilenet_v2",
                             "mobilenet_v3_small", "tiny_cnn"]
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*mobilenet_v1"):
        build_model("resnet50")


def test_registry_user_factory() -> None:
    model = build_model("tests.helpers_models:make_net", num_classes=3, width=6)
    assert isinstance(model, nn.Module)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.helpers_models:not_a_module", "returned str, expected a torch.nn.Module"),
        ("tests.helpers_models:missing", "has no attribute 'missing'"),
        ("tests.no_such_module:make_net", "cannot import module 'tests.no_such_module'"),
        ("tests.helpers_models:__all__", "is not callable"),
    ],
)
def test_registry_user_factory_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(spec)


def test_build_model_for_passes_only_accepted_data_kwargs() -> None:
    model = build_model_for("tests.helpers_models:make_net", (3, 16, 16), num_classes=5)
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)  # no input_size passed: no error
    fixed = build_model_for("tests.helpers_models:make_net_fixed", (1, 8, 8), num_classes=5)
    assert fixed(torch.randn(1, 1, 8, 8)).shape == (1, 10)
    tiny = build_model_for("tiny_cnn", (3, 12, 12), num_classes=4)
    assert tiny(torch.randn(1, 3, 12, 12)).shape == (1, 4)


def test_default_input_shape() -> None:
    assert default_input_shape("mobilenet_v2", "mnist_5k") == (1, 28, 28)
    assert default_input_shape("efficientnet_lite0") == (3, 224, 224)
    with pytest.raises(ValueError, match="no default input shape"):
        default_input_shape("pkg.mod:fn", "my_data")


def test_efficientnet_lite0_shipped_weights_load() -> None:
    path = lite0_weights_path()
    assert path.is_file() and path.stat().st_size > 10_000_000
    shipped = load_lite0_imagenet_state_dict()
    model = efficientnet_lite0(pretrained=True)
    state = model.state_dict()
    assert set(state) == set(shipped)
    assert all(torch.equal(state[k], shipped[k]) for k in shipped)
    # Trained, not freshly initialised: BN statistics moved away from their reset values.
    assert not torch.allclose(state["_bn0.running_var"], torch.ones(32))
    fresh = efficientnet_lite0(pretrained=False).state_dict()
    assert not torch.equal(fresh["_conv_stem.weight"], shipped["_conv_stem.weight"])


def test_efficientnet_lite0_adapted_keeps_pretrained_features() -> None:
    shipped = load_lite0_imagenet_state_dict()
    model = efficientnet_lite0(pretrained=True, num_classes=10, in_channels=1, input_size=28)
    state = model.state_dict()
    assert state["_fc.weight"].shape == (10, 1280)
    # A grey image x through the adapted stem equals the RGB image (x, x, x) through the original.
    expected = shipped["_conv_stem.weight"].sum(dim=1, keepdim=True)
    torch.testing.assert_close(state["_conv_stem.weight"], expected)
    assert torch.equal(
        state["_blocks.3._depthwise_conv.weight"], shipped["_blocks.3._depthwise_conv.weight"]
    )
