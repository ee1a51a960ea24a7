"""host.graph on small nets defined here: fusion units, channel groups, configs without
surgery vs real surgery, filter pruning, and ONNX export checked in ONNX Runtime."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn

from device_server.spec import Activation, OpKind
from host.graph import (
    ChannelPlanner,
    UnsupportedLayerError,
    apply_config,
    check_onnx,
    current_config,
    export_onnx,
    extract_units,
    find_groups,
    prune_group,
    uniform_width_config,
    unit_specs,
    units_for_config,
    validate_config,
)

SHAPE = (1, 1, 16, 16)  # (N, C, H, W): one grey 16x16 image
CLASSES = 10


def cbr(c_in: int, c_out: int, k: int = 3, s: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv + BN + ReLU6, "same" padding."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class MiniV1(nn.Module):
    """MobileNetV1-like: depthwise-separable convs, global pool, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 8, s=2),
            cbr(8, 8, groups=8),
            cbr(8, 16, k=1),
            cbr(16, 16, s=2, groups=16),
            cbr(16, 24, k=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))  # (N, 24, 1, 1)
        return self.classifier(torch.flatten(x, 1))  # (N, CLASSES)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [cbr(c_in, hidden, k=1)] if expand != 1 else []
        layers += [
            cbr(hidden, hidden, s=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MiniV2(nn.Module):
    """MobileNetV2-like: inverted residuals (one 8->8 projection whose add fuses, one 48->12
    whose add cannot), mean over H, W and a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 8, s=2),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            cbr(12, 32, k=1),
        )
        self.classifier = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + x)


class MiniRes(nn.Module):
    """ResNet-like: conv+add+relu fusion, max/avg pooling, flatten of a 4x4 map into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block = BasicBlock(8)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(self.block(self.pool(self.stem(x))))  # (N, 8, 4, 4)
        return self.fc(x.view(x.size(0), -1))


class SameConv(nn.Conv2d):
    """EfficientNet-style conv with TF "same" (here asymmetric) padding done in forward."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int, size: int, groups: int = 1):
        super().__init__(c_in, c_out, k, s, groups=groups, bias=False)
        out = -(-size // s)
        pad = max((out - 1) * s + k - size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.static_padding(x), self.weight, self.bias)


class MiniLite(nn.Module):
    """EfficientNet-Lite-like: same-padding conv subclasses, one shared ReLU6 module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SameConv(1, 8, 3, 2, 16)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = SameConv(8, 8, 5, 2, 8, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.project = SameConv(8, 16, 1, 1, 4)
        self.bn2 = nn.BatchNorm2d(16)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        x = self.act(self.bn1(self.dw(x)))
        x = self.act(self.bn2(self.project(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


NETS = [MiniV1, MiniV2, MiniRes, MiniLite]


def make(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    """A net with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def by_name(units, name):  # type: ignore[no-untyped-def]
    return next(u for u in units if u.name == name)


# -- units -----------------------------------------------------------------------------------


def test_units_mobilenet_v1_like() -> None:
    units = extract_units(make(MiniV1), SHAPE)
    specs = unit_specs(units)
    assert [s.op for s in specs] == [OpKind.CONV2D] * 5 + [OpKind.GLOBAL_AVG_POOL, OpKind.LINEAR]
    stem = units[0]
    assert stem.modules == ("features.0.0", "features.0.1", "features.0.2")  # conv+bn+relu6
    assert stem.spec.input_shape == (1, 1, 16, 16)
    assert (stem.spec.out_channels, stem.spec.stride, stem.spec.padding) == (8, (2, 2), (1, 1))
    assert stem.spec.batch_norm and stem.spec.activation is Activation.RELU6
    dw = units[1]
    assert dw.is_depthwise and dw.spec.groups == 8 and dw.spec.input_shape == (1, 8, 8, 8)
    assert units[4].spec.input_shape == (1, 16, 4, 4)
    assert specs[5].input_shape == (1, 24, 4, 4)
    assert specs[6].input_shape == (1, 24) and specs[6].out_channels == CLASSES
    assert specs[6].bias and units[6].is_output


def test_units_residual_add_fused_with_activation() -> None:
    units = extract_units(make(MiniRes), SHAPE)
    specs = unit_specs(units)
    assert [s.op for s in specs] == [
        OpKind.CONV2D,
        OpKind.MAX_POOL,
        OpKind.CONV2D,
        OpKind.CONV2D,
        OpKind.AVG_POOL,
        OpKind.LINEAR,
    ]
    assert specs[0].activation is Activation.RELU and not specs[0].batch_norm and specs[0].bias
    c2 = by_name(units, "block.c2")
    assert c2.spec.residual and c2.spec.activation is Activation.RELU and c2.spec.batch_norm
    assert c2.spec.input_shape == (1, 8, 8, 8)
    assert specs[1].kernel == (2, 2) and specs[1].stride == (2, 2)
    fc = by_name(units, "fc")
    assert fc.spec.input_shape == (1, 128) and fc.in_scale == 16


def test_units_residual_add_fused_into_projection_conv() -> None:
    units = extract_units(make(MiniV2), SHAPE)
    fused = by_name(units, "features.1.conv.1")  # 8 -> 8 projection + add
    assert len(fused.specs) == 1 and fused.spec.residual
    project = by_name(units, "features.3.conv.2")  # 48 -> 12 projection + add, as ORT fuses it
    (conv,) = project.specs
    assert conv.op is OpKind.CONV2D and conv.residual and conv.in_channels == 48
    assert conv.output_shape() == (1, 12, 4, 4)
    assert unit_specs(units)[-2].op is OpKind.GLOBAL_AVG_POOL  # x.mean((2, 3))


def test_units_same_padding_conv_subclass() -> None:
    units = extract_units(make(MiniLite), SHAPE)
    stem, dw = units[0], units[1]
    # TF "same": 16 -> 8 with pads (0, 1); the symmetric pad 1 gives the same output size
    assert stem.spec.padding == (1, 1) and stem.spec.output_shape() == (1, 8, 8, 8)
    assert dw.spec.kernel == (5, 5) and dw.spec.output_shape() == (1, 8, 4, 4)
    assert stem.modules == ("stem", "bn0", "act")


@pytest.mark.parametrize(
    ("layer", "name"),
    [(nn.GELU(), "act"), (nn.Upsample(scale_factor=2), "up")],
)
def test_unsupported_layer_named(layer: nn.Module, name: str) -> None:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 4, 3))
    model.add_module(name, layer)
    with pytest.raises(UnsupportedLayerError, match=repr(name)):
        extract_units(model, SHAPE)


def test_tensor_slicing_is_refused_by_name() -> None:
    class Slice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)[:, :4]

    with pytest.raises(UnsupportedLayerError, match="getitem.*slicing"):
        extract_units(Slice(), SHAPE)


def test_wrong_input_shape_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedLayerError, match="features.0.0"):
        extract_units(make(MiniV1), (1, 3, 16, 16))


# -- groups ----------------------------------------------------------------------------------


def test_groups_couple_residual_and_depthwise() -> None:
    model = make(MiniV2)
    groups = find_groups(model, SHAPE)
    layers = [set(g.layers) for g in groups]
    # the stem, the first block's depthwise conv and its 8->8 projection share one add
    assert {"features.0.0", "features.1.conv.0.0", "features.1.conv.1"} in layers
    # both 12-channel projections join in the second residual add
    assert {"features.2.conv.2", "features.3.conv.2"} in layers
    # classifier outputs never prunable; ids follow module order
    assert all("classifier" not in g.layers for g in groups)
    assert [g.id for g in groups] == list(range(len(groups)))
    assert current_config(model, groups) == {g.id: g.channels for g in groups}

    res_groups = find_groups(make(MiniRes), SHAPE)
    assert {"stem.0", "block.c2"} in [set(g.layers) for g in res_groups]


def test_head_conv_group_excluded_when_it_is_the_output() -> None:
    model = nn.Sequential(cbr(1, 8), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1))
    groups = find_groups(model, SHAPE)
    assert [g.layers for g in groups] == [("0.0",)]


@pytest.mark.parametrize("cls", NETS, ids=lambda c: c.__name__)
def test_units_for_config_matches_surgery(cls: type[nn.Module]) -> None:
    model = make(cls)
    units = extract_units(model, SHAPE)
    groups = find_groups(model, SHAPE, units)
    assert units_for_config(units, groups, {}) == unit_specs(units)
    rng = random.Random(cls.__name__)
    for _ in range(3):
        config = {g.id: rng.randint(1, g.channels) for g in groups if rng.random() < 0.8}
        pruned = apply_config(model, config, groups, input_shape=SHAPE)
        assert current_config(pruned, groups) == {**current_config(model, groups), **config}
        real = unit_specs(extract_units(pruned, SHAPE))
        assert units_for_config(units, groups, config) == real, config
        assert ChannelPlanner(units, groups).specs(config) == real
        assert pruned(torch.randn(2, *SHAPE[1:])).shape == (2, CLASSES)
    # the original is untouched
    assert current_config(model, groups) == {g.id: g.channels for g in groups}


def test_validate_config() -> None:
    groups = find_groups(make(MiniV1), SHAPE)
    validate_config(groups, {0: 1, 1: groups[1].channels})
    with pytest.raises(ValueError, match="unknown group"):
        validate_config(groups, {99: 1})
    with pytest.raises(ValueError, match="channels"):
        validate_config(groups, {0: groups[0].channels + 1})
    with pytest.raises(ValueError):
        validate_config(groups, {0: 0})


# -- surgery ---------------------------------------------------------------------------------


def test_prune_keeps_highest_norm_filters() -> None:
    model = make(MiniV1)
    first = model.features[0][0]
    with torch.no_grad():
        scale = torch.tensor([0.1, 5.0, 0.2, 4.0, 3.0, 0.3, 2.0, 0.4])  # keep 1, 3, 4, 6
        first.weight.mul_(
            scale.view(-1, 1, 1, 1) / first.weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        )
    groups = find_groups(model, SHAPE)
    g = next(g for g in groups if g.root == "features.0.0")
    # the depthwise conv of the group counts too; make its filters equal so the conv decides
    with torch.no_grad():
        model.features[1][0].weight.fill_(1.0)
    pruned = prune_group(model, g, 4, input_shape=SHAPE)
    keep = [1, 3, 4, 6]
    assert torch.equal(pruned.features[0][0].weight, first.weight[keep])
    bn, bn0 = pruned.features[0][1], model.features[0][1]
    assert torch.equal(bn.running_mean, bn0.running_mean[keep])
    assert torch.equal(bn.weight, bn0.weight[keep])
    assert pruned.features[1][0].groups == 4
    assert torch.equal(pruned.features[2][0].weight, model.features[2][0].weight[:, keep])
    # by id and by root name: the same result
    for ref in (g.id, g.root):
        other = prune_group(model, ref, 4, input_shape=SHAPE)
        assert torch.equal(other.features[0][0].weight, pruned.features[0][0].weight)
    assert model.features[0][0].out_channels == 8  # original untouched
    with pytest.raises(ValueError):
        prune_group(model, g, 9, input_shape=SHAPE)


def test_l1_and_callable_importance() -> None:
    model = make(MiniRes)
    groups = find_groups(model, SHAPE)
    g = next(g for g in groups if g.root == "block.c1")
    l1 = prune_group(model, g, 3, importance="l1", input_shape=SHAPE)
    assert l1.block.c1.out_channels == 3 and l1.block.c2.in_channels == 3
    first_three = prune_group(
        model, g, 3, importance=lambda grp: -torch.arange(8.0), input_shape=SHAPE
    )
    assert torch.equal(first_three.block.c1.weight, model.block.c1.weight[:3])
    with pytest.raises(ValueError, match="importance"):
        prune_group(model, g, 3, importance="l3", input_shape=SHAPE)


def test_uniform_width_config_and_forward() -> None:
    model = make(MiniV2)
    groups = find_groups(model, SHAPE)
    config = uniform_width_config(groups, 0.5, round_to=8)
    for g in groups:
        want = max(1, round(g.channels / 2)) if g.channels <= 8 else None
        assert config[g.id] <= g.channels and (want is None or config[g.id] == want)
    assert config[next(g.id for g in groups if g.channels == 32)] == 16
    pruned = apply_config(model, config, groups, input_shape=SHAPE)
    assert pruned(torch.randn(SHAPE)).shape == (1, CLASSES)
    assert uniform_width_config(groups, 1.0) == current_config(model, groups)
    with pytest.raises(ValueError):
        uniform_width_config(groups, 0.0)


# -- ONNX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [MiniV2, MiniLite], ids=lambda c: c.__name__)
def test_onnx_export_matches_torch(cls: type[nn.Module], tmp_path) -> None:  # type: ignore[no-untyped-def]
    import onnx

    model = make(cls)
    groups = find_groups(model, SHAPE)
    pruned = apply_config(
        model, uniform_width_config(groups, 0.75, round_to=2), groups, input_shape=SHAPE
    )
    pruned.train()
    path = tmp_path / "pruned.onnx"
    data = export_onnx(pruned, SHAPE, path)
    assert pruned.training  # export works on an eval copy
    assert path.read_bytes() == data
    proto = onnx.load_from_string(data)
    assert proto.opset_import[0].version == 17
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert check_onnx(pruned, data, SHAPE) < 1e-4
