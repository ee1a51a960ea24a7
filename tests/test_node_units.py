"""NODE units: any ONNX node NetAdapt's fixed kinds do not model, keyed by op type, attributes
and shapes, built and timed by the daemon, stored and interpolated like any unit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from device_server import wire
from device_server.builder import build_layer_model
from device_server.errors import InvalidConfigError
from device_server.server import RunningServer
from device_server.spec import Activation, LayerSpec, NodeOperand, OpKind
from host.device.client import DeviceClient, MeasureFailure
from host.graph import extract_units, unit_specs
from lut.estimator import LatencyEstimator
from tests.conftest import FAST_POLICY


def _mul(c: int, hw: int = 8) -> LayerSpec:
    return LayerSpec.node("Mul", [NodeOperand.input((1, c, hw, hw)),
                                  NodeOperand.input((1, c, 1, 1))], [(1, c, hw, hw)])


def _concat(a: int, b: int) -> LayerSpec:
    return LayerSpec.node("Concat", [NodeOperand.input((1, a, 8, 8)),
                                     NodeOperand.input((1, b, 8, 8))], [(1, a + b, 8, 8)],
                          {"axis": 1})


def _split(c: int) -> LayerSpec:
    half = c // 2
    return LayerSpec.node("Split", [NodeOperand.input((1, c, 8, 8)),
                                    NodeOperand.const([half, c - half])],
                          [(1, half, 8, 8), (1, c - half, 8, 8)], {"axis": 1})


def _bn(c: int) -> LayerSpec:
    return LayerSpec.node("BatchNormalization",
                          [NodeOperand.input((1, c, 8, 8))] + [NodeOperand.weight((c,))] * 4,
                          [(1, c, 8, 8)], {"epsilon": 1e-5})


def test_node_specs_round_trip_and_keep_old_keys_unchanged() -> None:
    for spec in (_mul(16), _concat(8, 24), _split(16), _bn(8)):
        assert LayerSpec.from_dict(spec.to_dict()) == spec
        assert wire.layer_from_proto(wire.layer_to_proto(spec)) == spec
        assert spec.key() != _mul(8).key() or spec == _mul(8)
    conv = LayerSpec.create("conv2d", (1, 3, 8, 8), out_channels=8)
    assert "node_op" not in conv.key() and "operands" not in conv.key()
    assert _split(16).output_shape() == (1, 8, 8, 8) and _bn(8).param_count() == 32


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"op_type": "mul", "operands": [NodeOperand.input((1, 4))], "out_shapes": [(1, 4)]},
     "ONNX op type"),
    ({"op_type": "Mul", "operands": [NodeOperand.weight((4,))], "out_shapes": [(4,)]},
     "first operand must be an input"),
    ({"op_type": "Split", "operands": [NodeOperand.input((1, 4)),
                                       NodeOperand(kind="const", shape=(2,), values=(2,),
                                                   dtype="int64")],
      "out_shapes": [(1, 2), (1, 2)]}, "needs 2 values"),
    ({"op_type": "Relu", "operands": [NodeOperand.input((1, 4))], "out_shapes": []},
     "out_shapes"),
])
def test_bad_node_specs_name_the_problem(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        LayerSpec.node(**kwargs)  # type: ignore[arg-type]


def test_fixed_kinds_refuse_node_fields() -> None:
    with pytest.raises(InvalidConfigError, match="node units only"):
        LayerSpec.create("conv2d", (1, 3, 8, 8), out_channels=8, node_op="Mul")


def test_the_daemon_builds_what_onnx_infers_and_refuses_the_rest() -> None:
    for spec in (_mul(16), _concat(8, 24), _split(16), _bn(8)):
        session = ort.InferenceSession(build_layer_model(spec).SerializeToString())
        feeds = {i.name: np.random.rand(*i.shape).astype(np.float32)
                 for i in session.get_inputs()}
        shapes = [o.shape for o in session.run(None, feeds)]
        assert [tuple(s) for s in shapes] == list(spec.out_shapes)
    wrong = LayerSpec.node("Concat", [NodeOperand.input((1, 8, 8, 8)),
                                      NodeOperand.input((1, 8, 8, 8))], [(1, 12, 8, 8)],
                           {"axis": 1})
    with pytest.raises(InvalidConfigError, match="Concat"):
        build_layer_model(wrong)
    with pytest.raises(InvalidConfigError, match="No Op registered for Frobnicate"):
        build_layer_model(LayerSpec.node("Frobnicate", [NodeOperand.input((1, 4))], [(1, 4)]))


def test_new_activations_fuse_into_convs_and_run() -> None:
    for act in (Activation.SIGMOID, Activation.HARDSIGMOID, Activation.SILU):
        spec = LayerSpec.create("conv2d", (1, 4, 8, 8), out_channels=8, batch_norm=True,
                                activation=act)
        session = ort.InferenceSession(build_layer_model(spec).SerializeToString())
        (out,) = session.run(None, {"x": np.random.rand(1, 4, 8, 8).astype(np.float32)})
        assert out.shape == (1, 8, 8, 8)
        if act is not Activation.SILU:
            assert 0.0 <= out.min() and out.max() <= 1.0  # gates


def test_node_units_are_timed_by_the_daemon_bad_ones_answered_in_band(
        daemon: RunningServer) -> None:
    wrong = LayerSpec(op=OpKind.NODE, input_shape=(1, 8, 8, 8), node_op="Concat",
                      operands=(NodeOperand.input((1, 8, 8, 8)),
                                NodeOperand.input((1, 8, 8, 8))),
                      attributes=(("axis", 1),), out_shapes=((1, 12, 8, 8),))
    specs = [_mul(16), _concat(8, 24), _split(16), _bn(8), wrong]
    with DeviceClient(daemon.address) as client:
        by_spec = {r.spec: r for r in client.measure_many(specs, policy=FAST_POLICY)}
    for spec in specs[:4]:
        r = by_spec[spec]
        assert not isinstance(r, MeasureFailure) and r.timing.median_ms > 0
    bad = by_spec[wrong]
    assert isinstance(bad, MeasureFailure) and bad.code == "INVALID_ARGUMENT"
    assert "Concat" in bad.message


def test_node_units_interpolate_on_their_channel_grid() -> None:
    est = LatencyEstimator({_mul(8).key(): 1.0, _mul(16).key(): 2.0,
                            _bn(8).key(): 3.0, _bn(24).key(): 5.0}, overhead_ms=0.0)
    assert est.unit_ms(_mul(12)) == pytest.approx(1.5)
    assert est.unit_ms(_bn(16)) == pytest.approx(4.0)
    assert est.interpolated == 2
    with pytest.raises(KeyError):
        est.unit_ms(_mul(12, hw=4))  # another spatial size: another family


class SqueezeExcite(nn.Module):
    """MobileNetV3's block tail: hard-swish conv, SE with a hard-sigmoid gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.fc1 = nn.Conv2d(16, 8, 1)
        self.fc2 = nn.Conv2d(8, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        s = nn.functional.adaptive_avg_pool2d(x, 1)
        s = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))
        return self.head(x * s)


def test_squeeze_excite_units() -> None:
    units = extract_units(SqueezeExcite().eval(), (1, 1, 8, 8))
    specs = unit_specs(units)
    ops = [s.op if s.op is not OpKind.NODE else s.node_op for s in specs]
    assert ops == [OpKind.CONV2D, OpKind.GLOBAL_AVG_POOL, OpKind.CONV2D, OpKind.CONV2D, "Mul",
                   OpKind.GLOBAL_AVG_POOL, OpKind.LINEAR]
    assert specs[0].activation is Activation.HARDSWISH
    assert specs[2].activation is Activation.RELU and specs[3].activation is Activation.HARDSIGMOID
    mul = units[4]
    assert mul.rule == "carry" and mul.inputs == (0, 3)
    assert [o.shape for o in specs[4].operands] == [(1, 16, 8, 8), (1, 16, 1, 1)]


def test_architectures_differ_by_their_node_ops_and_not_by_channels() -> None:
    """Calibration rows are shared by one architecture's variants: a network whose only
    difference is a node's op (Mul vs Add) or attribute is another architecture."""
    from lut.calibration import architecture_of

    def add(c: int) -> LayerSpec:
        return LayerSpec.node("Add", [NodeOperand.input((1, c, 8, 8)),
                                      NodeOperand.input((1, c, 1, 1))], [(1, c, 8, 8)])

    assert architecture_of([_mul(16)]) == architecture_of([_mul(8)])
    assert architecture_of([_mul(16)]) != architecture_of([add(16)])
    assert architecture_of([_concat(8, 8)]) == architecture_of([_concat(16, 8)])
