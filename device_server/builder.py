"""Builds the ONNX graph of one fusion unit with `onnx.helper` (no torch).

Weights are random initializers: timing depends on shapes, not values. The graph is what the
runtime fuses as one kernel where it can (Conv+BatchNorm+Add+activation), so a unit measured
alone runs the same kernel it runs inside a whole network.

A NODE unit is one ONNX node of any type, built from its operands (graph inputs, random weights,
constants) and attributes; ONNX's shape inference must agree with the output shapes the spec
states, else the spec is refused. That one path covers everything the fixed kinds do not model
(channel-wise multiplies, concatenations, splits, transposes, standalone normalisations and
activations) without a branch per op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from device_server.errors import InvalidConfigError
from device_server.spec import Activation, LayerSpec, OpKind

__all__ = ["build_layer_model", "build_identity_model", "OPSET", "IR_VERSION"]

# Opset 17 has every op we emit (HardSwish needs >= 14). IR 8 keeps the models loadable by the
# older ONNX Runtime builds that Termux and board distributions package.
OPSET = 17
IR_VERSION = 8


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array.astype(np.float32), name)


def _activation(act: Activation, inp: str, out: str) -> list[onnx.NodeProto]:
    if act is Activation.RELU:
        return [helper.make_node("Relu", [inp], [out])]
    if act is Activation.RELU6:
        # Clip(0, 6) with constant inputs: what PyTorch exports for ReLU6 and what ORT fuses.
        return [helper.make_node("Clip", [inp, "relu6_min", "relu6_max"], [out])]
    if act is Activation.HARDSWISH:
        return [helper.make_node("HardSwish", [inp], [out])]
    if act is Activation.SIGMOID:
        return [helper.make_node("Sigmoid", [inp], [out])]
    if act is Activation.HARDSIGMOID:
        # torch's hardsigmoid, relu6(x + 3) / 6, as torch exports it
        return [helper.make_node("HardSigmoid", [inp], [out], alpha=1.0 / 6.0, beta=0.5)]
    if act is Activation.SILU:
        # what torch exports for SiLU (ORT may fuse the pair, here as in a whole network)
        return [helper.make_node("Sigmoid", [inp], [f"{out}_gate"]),
                helper.make_node("Mul", [inp, f"{out}_gate"], [out])]
    return [helper.make_node("Identity", [inp], [out])]


def build_layer_model(spec: LayerSpec, seed: int = 0) -> onnx.ModelProto:
    """The one-unit ONNX model for `spec` (inputs "x" and, for add/residual, "y"; output "out").

    Raises:
        InvalidConfigError: from `spec.validate()` if the unit cannot be built.
    """
    spec.validate()
    rng = np.random.default_rng(seed)
    if spec.op is OpKind.NODE:
        return _node_model(spec, rng)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(spec.input_shape))]
    out_shape = list(spec.output_shape())
    act = spec.activation
    if act is Activation.RELU6:
        inits += [_init("relu6_min", np.array(0.0)), _init("relu6_max", np.array(6.0))]

    if spec.op is OpKind.CONV2D:
        cin_per_group = spec.in_channels // spec.groups
        w = rng.standard_normal((spec.out_channels, cin_per_group, *spec.kernel)) * 0.1
        inits.append(_init("w", w))
        conv_inputs = ["x", "w"]
        if spec.bias:
            inits.append(_init("b", rng.standard_normal(spec.out_channels) * 0.1))
            conv_inputs.append("b")
        nodes.append(
            helper.make_node(
                "Conv",
                conv_inputs,
                ["conv"],
                kernel_shape=list(spec.kernel),
                strides=list(spec.stride),
                pads=[spec.padding[0], spec.padding[1], spec.padding[0], spec.padding[1]],
                dilations=list(spec.dilation),
                group=spec.groups,
            )
        )
        last = "conv"
        if spec.batch_norm:
            c = spec.out_channels
            inits += [
                _init("bn_scale", 1.0 + 0.1 * rng.standard_normal(c)),
                _init("bn_bias", 0.1 * rng.standard_normal(c)),
                _init("bn_mean", 0.1 * rng.standard_normal(c)),
                _init("bn_var", 1.0 + 0.1 * rng.random(c)),
            ]
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    ["conv", "bn_scale", "bn_bias", "bn_mean", "bn_var"],
                    ["bn"],
                    epsilon=1e-5,
                )
            )
            last = "bn"
        if spec.residual:
            inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape))
            nodes.append(helper.make_node("Add", [last, "y"], ["sum"]))
            last = "sum"
        nodes += _activation(act, last, "out")
    elif spec.op is OpKind.LINEAR:
        w = rng.standard_normal((spec.out_channels, spec.in_channels)) * 0.1
        inits.append(_init("w", w))
        gemm_inputs = ["x", "w"]
        if spec.bias:
            inits.append(_init("b", rng.standard_normal(spec.out_channels) * 0.1))
            gemm_inputs.append("b")
        nodes.append(helper.make_node("Gemm", gemm_inputs, ["gemm"], transB=1))
        nodes += _activation(act, "gemm", "out")
    elif spec.op in (OpKind.MAX_POOL, OpKind.AVG_POOL):
        op_type = "MaxPool" if spec.op is OpKind.MAX_POOL else "AveragePool"
        attrs: dict[str, Any] = {
            "kernel_shape": list(spec.kernel),
            "strides": list(spec.stride),
            "pads": [spec.padding[0], spec.padding[1], spec.padding[0], spec.padding[1]],
        }
        if spec.op is OpKind.MAX_POOL:
            attrs["dilations"] = list(spec.dilation)
        nodes.append(helper.make_node(op_type, ["x"], ["pool"], **attrs))
        nodes += _activation(act, "pool", "out")
    elif spec.op is OpKind.GLOBAL_AVG_POOL:
        nodes.append(helper.make_node("GlobalAveragePool", ["x"], ["pool"]))
        nodes += _activation(act, "pool", "out")
    elif spec.op is OpKind.ADD:
        inputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape))
        nodes.append(helper.make_node("Add", ["x", "y"], ["sum"]))
        nodes += _activation(act, "sum", "out")
    else:  # pragma: no cover - OpKind is exhaustive
        raise AssertionError(f"unhandled op {spec.op}")

    output = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, f"unit_{spec.digest()}", inputs, [output], inits)
    return _model(graph)


def _node_model(spec: LayerSpec, rng: np.random.Generator) -> onnx.ModelProto:
    """One node of type `spec.node_op`: input operands are graph inputs ("x", "x1", ...),
    weights random positive initializers (a BatchNormalization's variance must be), constants
    initializers holding their values."""
    inputs: list[onnx.ValueInfoProto] = []
    inits: list[onnx.TensorProto] = []
    names: list[str] = []
    for i, operand in enumerate(spec.operands):
        if operand.kind == "input":
            name = "x" if not inputs else f"x{len(inputs)}"
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                        list(operand.shape)))
        elif operand.kind == "weight":
            name = f"w{i}"
            inits.append(_init(name, rng.random(operand.shape) + 0.5))
        else:
            name = f"c{i}"
            dtype = np.int64 if operand.dtype == "int64" else np.float32
            values = np.array(operand.values, dtype=dtype).reshape(operand.shape)
            inits.append(numpy_helper.from_array(values, name))
        names.append(name)
    outs = ["out"] + [f"out{i}" for i in range(1, len(spec.out_shapes))]
    attrs: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v
                             for k, v in spec.attributes}
    node = helper.make_node(spec.node_op, names, outs, **attrs)
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape))
               for n, shape in zip(outs, spec.out_shapes, strict=True)]
    graph = helper.make_graph([node], f"unit_{spec.digest()}", inputs, outputs, inits)
    try:
        model = _model(graph)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidConfigError(
            f"{spec.describe()}: not a valid ONNX {spec.node_op} node with these operands and "
            f"attributes (opset {OPSET}): {first}") from None
    for value in inferred.graph.output:
        dims = tuple(d.dim_value for d in value.type.tensor_type.shape.dim)
        want = spec.out_shapes[outs.index(value.name)]
        if dims and all(dims) and dims != want:
            raise InvalidConfigError(
                f"{spec.describe()}: ONNX infers output {value.name} of shape {list(dims)}, "
                f"the spec says {list(want)}")
    return model


def build_identity_model(shape: tuple[int, ...] = (1, 1)) -> onnx.ModelProto:
    """A graph that does (almost) nothing: timing it gives the per-call overhead of a run."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(shape))
    node = helper.make_node("Identity", ["x"], ["out"])
    graph = helper.make_graph([node], "identity", [x], [out])
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="netadapt-device",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
