"""Torch calls that no fixed `LayerSpec` kind describes, as single ONNX nodes.

A registry keyed by what a traced fx node calls (module type, function or method name). Each
entry turns the call into a `NodeDraft`: the ONNX op type torch's exporter emits for it, its
attributes and its operands (tensors, still as fx nodes, and constants). The walker in
`host.graph.units` resolves the tensors to the units that produce them and makes a NODE unit,
measured as that one node with its real shapes. A new op is one entry here: nothing else in the
table, the estimator or the daemon changes.

Covered: sigmoid, hard-sigmoid, tanh, ReLU/ReLU6/hard-swish/leaky ReLU/hardtanh/clamp when no
conv absorbs them, softmax, standalone BatchNorm2d, elementwise add/sub/mul/div with
broadcasting (squeeze-and-excitation gates), concatenation, chunk/split, transpose/permute (the
middle of a channel shuffle).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from device_server.spec import AttrValue, NodeOperand
from host.graph.tracing import shape_of, shapes_of

__all__ = ["NodeDraft", "node_draft", "reshape_draft", "supported_ops"]

Operand = fx.Node | NodeOperand


@dataclass(frozen=True)
class NodeDraft:
    """One ONNX node for a torch call; tensor operands still fx nodes."""

    op_type: str
    operands: tuple[Operand, ...]
    out_shapes: tuple[tuple[int, ...], ...]
    attributes: dict[str, AttrValue] = field(default_factory=dict)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _outs(node: fx.Node) -> tuple[tuple[int, ...], ...]:
    shape = shape_of(node)
    if shape is not None:
        return (shape,)
    shapes = shapes_of(node)
    return shapes if shapes is not None else ()


def _axis(dim: Any, rank: int) -> int:
    return int(dim) % rank if rank else int(dim)


def _scalar(value: Any) -> NodeOperand | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return NodeOperand.const([float(value)], (), "float")


def _tensor_or_scalar(value: Any) -> Operand | None:
    if isinstance(value, fx.Node) and shape_of(value) is not None:
        return value
    return _scalar(value)


# -- drafts per kind of call ----------------------------------------------------------------------

def _unary(op_type: str, **attributes: AttrValue) -> Callable[[fx.Node, Any], NodeDraft | None]:
    def draft(node: fx.Node, module: Any) -> NodeDraft | None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(x, fx.Node):
            return None
        return NodeDraft(op_type, (x,), _outs(node), dict(attributes))
    return draft


def _clip(low: float, high: float) -> NodeDraft | Callable[[fx.Node, Any], NodeDraft | None]:
    def draft(node: fx.Node, module: Any) -> NodeDraft | None:
        x = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(x, fx.Node):
            return None
        return NodeDraft("Clip", (x, NodeOperand.const([low], (), "float"),
                                  NodeOperand.const([high], (), "float")), _outs(node))
    return draft


def _hardtanh(node: fx.Node, module: Any) -> NodeDraft | None:
    if isinstance(module, nn.Hardtanh):
        low, high = module.min_val, module.max_val
    elif node.target in ("clamp", "clamp_", "clip", torch.clamp, torch.clip):
        low, high = _arg(node, 1, "min"), _arg(node, 2, "max")
    else:
        low, high = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)):
        return None
    return _clip(float(low), float(high))(node, module)  # type: ignore[operator]


def _leaky_relu(node: fx.Node, module: Any) -> NodeDraft | None:
    slope = module.negative_slope if module is not None else _arg(node, 1, "negative_slope", 0.01)
    return _unary("LeakyRelu", alpha=float(slope))(node, module)


def _softmax(node: fx.Node, module: Any) -> NodeDraft | None:
    dim = module.dim if module is not None else _arg(node, 1, "dim")
    shape = shape_of(node)
    if dim is None or shape is None:
        return None
    return _unary("Softmax", axis=_axis(dim, len(shape)))(node, module)


def _batch_norm(node: fx.Node, module: Any) -> NodeDraft | None:
    x = node.args[0] if node.args else None
    shape = shape_of(x)
    if not isinstance(module, nn.BatchNorm2d) or shape is None or len(shape) != 4:
        return None
    c = (shape[1],)
    weights = tuple(NodeOperand.weight(c) for _ in range(4))  # scale, bias, mean, variance
    assert isinstance(x, fx.Node)
    return NodeDraft("BatchNormalization", (x, *weights), _outs(node),
                     {"epsilon": float(module.eps)})


def _binary(op_type: str) -> Callable[[fx.Node, Any], NodeDraft | None]:
    def draft(node: fx.Node, module: Any) -> NodeDraft | None:
        a = _tensor_or_scalar(_arg(node, 0, "input"))
        b = _tensor_or_scalar(_arg(node, 1, "other"))
        if a is None or b is None or not any(isinstance(o, fx.Node) for o in (a, b)):
            return None
        if node.kwargs.get("alpha", 1) != 1:
            return None
        if isinstance(a, NodeOperand):  # ONNX wants the tensor first where the op commutes
            if op_type in ("Add", "Mul"):
                a, b = b, a
            else:
                return None
        return NodeDraft(op_type, (a, b), _outs(node))
    return draft


def _concat(node: fx.Node, module: Any) -> NodeDraft | None:
    tensors = _arg(node, 0, "tensors")
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    if not all(isinstance(t, fx.Node) and shape_of(t) is not None for t in tensors):
        return None
    out = shape_of(node)
    if out is None:
        return None
    dim = _arg(node, 1, "dim", 0)
    return NodeDraft("Concat", tuple(tensors), (out,), {"axis": _axis(dim, len(out))})


def _split(node: fx.Node, module: Any) -> NodeDraft | None:
    x = _arg(node, 0, "input")
    shapes = shapes_of(node)
    in_shape = shape_of(x)
    if not isinstance(x, fx.Node) or shapes is None or in_shape is None:
        return None
    dim = _arg(node, 2, "dim", 0)
    axis = _axis(dim, len(in_shape))
    sizes = [s[axis] for s in shapes]
    return NodeDraft("Split", (x, NodeOperand.const(sizes)), shapes, {"axis": axis})


def _transpose(node: fx.Node, module: Any) -> NodeDraft | None:
    x = _arg(node, 0, "input")
    in_shape = shape_of(x)
    if not isinstance(x, fx.Node) or in_shape is None:
        return None
    rank = len(in_shape)
    if node.target in ("permute", torch.permute):
        dims = node.args[1:] if node.target == "permute" else (_arg(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = tuple(dims[0])
        perm = [_axis(d, rank) for d in dims]
    else:
        d0, d1 = _axis(_arg(node, 1, "dim0"), rank), _axis(_arg(node, 2, "dim1"), rank)
        perm = list(range(rank))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    return NodeDraft("Transpose", (x,), _outs(node), {"perm": tuple(perm)})


def reshape_draft(node: fx.Node, x: fx.Node) -> NodeDraft:
    """A reshape whose channels cannot follow pruning, as the Reshape node torch exports (the
    target shape a constant)."""
    out = shape_of(node)
    assert out is not None
    return NodeDraft("Reshape", (x, NodeOperand.const(list(out))), (out,))


# -- the registry ---------------------------------------------------------------------------------

_Draft = Callable[[fx.Node, Any], NodeDraft | None]

_BY_NAME: dict[str, _Draft] = {
    "sigmoid": _unary("Sigmoid"),
    "tanh": _unary("Tanh"),
    "relu": _unary("Relu"),
    "relu6": _clip(0.0, 6.0),  # type: ignore[dict-item]
    "hardswish": _unary("HardSwish"),
    "hardsigmoid": _unary("HardSigmoid", alpha=1.0 / 6.0, beta=0.5),
    "hardtanh": _hardtanh,
    "leaky_relu": _leaky_relu,
    "softmax": _softmax,
    "batch_norm": _batch_norm,
    "add": _binary("Add"),
    "sub": _binary("Sub"),
    "mul": _binary("Mul"),
    "div": _binary("Div"),
    "cat": _concat,
    "split": _split,
    "transpose": _transpose,
}
_MODULES: dict[type[nn.Module], str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid",
    nn.Hardtanh: "hardtanh",
    nn.LeakyReLU: "leaky_relu",
    nn.Softmax: "softmax",
    nn.BatchNorm2d: "batch_norm",
}
_FUNCTIONS: dict[Any, str] = {
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh",
    torch.relu: "relu", torch.relu_: "relu", F.relu: "relu",
    F.relu6: "relu6",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.hardtanh: "hardtanh", torch.clamp: "hardtanh", torch.clip: "hardtanh",
    F.leaky_relu: "leaky_relu",
    F.softmax: "softmax", torch.softmax: "softmax",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.chunk: "split", torch.split: "split", torch.tensor_split: "split",
    torch.transpose: "transpose", torch.permute: "transpose",
}
_METHODS: dict[str, str] = {
    "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh",
    "relu": "relu", "relu_": "relu", "clamp": "hardtanh", "clamp_": "hardtanh",
    "clip": "hardtanh", "softmax": "softmax",
    "add": "add", "add_": "add", "__add__": "add", "__radd__": "add",
    "sub": "sub", "sub_": "sub", "mul": "mul", "mul_": "mul", "__mul__": "mul",
    "__rmul__": "mul", "div": "div", "div_": "div", "__truediv__": "div",
    "chunk": "split", "split": "split", "transpose": "transpose", "permute": "transpose",
}


def op_name(node: fx.Node, module: nn.Module | None) -> str | None:
    """The registry name of what `node` calls, or None when it is not registered."""
    if node.op == "call_module":
        return next((n for t, n in _MODULES.items() if isinstance(module, t)), None)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    return None


def node_draft(node: fx.Node, module: nn.Module | None) -> NodeDraft | None:
    """The ONNX node for `node`'s call, or None when the registry does not cover it (or this
    particular use of it, e.g. a clamp without both bounds)."""
    name = op_name(node, module)
    if name is None:
        return None
    draft = _BY_NAME[name](node, module)
    if draft is None or not draft.out_shapes:
        return None
    return draft


def supported_ops() -> list[str]:
    """Names of the registered calls, for messages."""
    return sorted(_BY_NAME)
