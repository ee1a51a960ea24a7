"""Fusion units: the sequence of `LayerSpec`s a torch model runs as, once exported to ONNX and
optimised by ONNX Runtime.

`extract_units` traces the model with torch.fx (`host.graph.tracing`: every conv/linear/BN/
pool/activation instance one node, real shapes recorded) and walks the graph in execution
order, fusing as the runtime does:

* Conv2d [+ BatchNorm2d] [+ residual add that consumes the conv output directly] [+ activation]
  (relu / relu6 / hardswish / sigmoid / hard-sigmoid / SiLU; the activation of a residual unit
  comes after the add);
* Linear [+ activation];
* MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) / mean over H, W -> global_avg_pool;
* an add of two equal NCHW tensors that no conv absorbs -> a standalone `add` unit [+ activation].

Everything else that computes is a NODE unit: the one ONNX node torch exports for it, with its
real shapes (`host.graph.node_ops`: squeeze-and-excitation multiplies, concatenations, splits,
transposes, standalone BatchNorm or activations, ...). Dropout, Identity, flatten and
channel-preserving reshapes cost nothing and are skipped, as are ops that return their input
unchanged in eval mode (stochastic depth); a reshape that moves or pins the channel axis is a
Reshape NODE. An op the registry lacks raises `UnsupportedLayerError` naming the layer.

Each `FusionUnit` records where its inputs come from and how its output channel count follows
them (`rule`), so that the channel counts of a pruned network can be derived without tracing
again (see `host.graph.groups`). A residual add that consumes a conv's output directly is fused
into that conv's unit (`residual=True`), as ONNX Runtime's ENABLE_ALL level fuses
Conv+Add(+activation), whatever the conv's input shape (e.g. MobileNetV2's 1x1 projection).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from device_server.errors import InvalidConfigError
from device_server.spec import Activation, LayerSpec, NodeOperand, OpKind
from host.graph.node_ops import NodeDraft, node_draft, reshape_draft, supported_ops
from host.graph.tracing import TraceError, aliases_input, shape_of, shapes_of, trace, where

__all__ = [
    "UnsupportedLayerError",
    "FusionUnit",
    "ChannelRule",
    "INPUT_SOURCE",
    "CONSTANT_SOURCE",
    "extract_units",
    "unit_specs",
    "build_specs",
]

logger = logging.getLogger(__name__)

INPUT_SOURCE = -1
"""Producer index of the network input."""
CONSTANT_SOURCE = -2
"""Producer index of a parameter or buffer read as a tensor (its channels never change)."""

ChannelRule = Literal["own", "carry", "concat", "fixed"]
"""How a unit's output channel count follows its inputs: "own" (a conv/linear: its own count),
"carry" (the count of input `carry_from`: pools, adds, depthwise convs, elementwise NODEs),
"concat" (the sum of its inputs), "fixed" (never changes: a NODE whose shapes cannot follow
pruning, such as a transpose of a reshaped tensor)."""


class UnsupportedLayerError(ValueError):
    """The model holds a layer or op that no `LayerSpec` can describe, or that cannot be traced.

    The message names the layer (module path or graph node) and what to change.
    """


@dataclass(frozen=True)
class FusionUnit:
    """One fusion unit of a traced model.

    `core` is the main op with neither activation nor residual; `activation` is applied last
    (after the residual add when `residual_add`). `specs` is what the runtime executes.
    `inputs` are the producers of every tensor the unit reads (unit indices, `INPUT_SOURCE`,
    `CONSTANT_SOURCE`) in operand order, `ports` which output of each producer it reads, and
    `scales` how many elements of the operand's axis 1 each channel of the producer makes (a
    flatten of H x W before a linear: H*W).
    """

    index: int  # position in the unit list
    core: LayerSpec  # main op, activation NONE, residual False
    activation: Activation
    residual_add: bool  # an add consumes this conv's (+BN's) output directly
    modules: tuple[str, ...]  # torch module names covered: conv/linear/pool, bn, activation
    nodes: tuple[str, ...]  # fx node names covered (functional adds and activations included)
    source: int  # unit whose output is this unit's input; INPUT_SOURCE for the network input
    operand: int | None = None  # the other input of an add (unit index, or INPUT_SOURCE)
    in_scale: int = 1  # linear after flatten: in_features per channel of the source (H*W)
    is_output: bool = False  # its output (through reshapes) is a network output
    inputs: tuple[int, ...] = ()  # producer of each tensor operand, in order
    ports: tuple[int, ...] = ()  # output index of each producer (a Split has several)
    scales: tuple[int, ...] = ()  # operand axis-1 size per producer channel
    operand_index: tuple[int, ...] = ()  # NODE: the spec operand each input feeds
    rule: ChannelRule = "own"
    carry_from: int = 0  # "carry": the input whose channel count the output has
    out_channels_by_port: tuple[int, ...] = ()  # channel count of each output, as traced
    note: str = ""  # "fixed": why its shapes cannot follow pruning, for messages

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        return build_specs(self.core, self.activation, self.residual_add)

    @property
    def spec(self) -> LayerSpec:
        """The main spec (the fused one when the residual is fused)."""
        return self.specs[0]

    @property
    def name(self) -> str:
        """The main module's name, or the fx node name for functional ops."""
        return self.modules[0] if self.modules else self.nodes[0]

    @property
    def in_channels(self) -> int:
        return self.core.input_shape[1] if len(self.core.input_shape) > 1 else 1

    @property
    def out_channels(self) -> int:
        if self.out_channels_by_port:
            return self.out_channels_by_port[0]
        return self.specs[-1].output_shape()[1]

    @property
    def is_depthwise(self) -> bool:
        c = self.core
        return (
            c.op is OpKind.CONV2D and c.groups == c.in_channels == c.out_channels and c.groups > 1
        )

    @property
    def coupled(self) -> tuple[bool, ...]:
        """Per input: its channel count must equal the output's (the operands of an add or a
        multiply; not a broadcast gate of one channel, not a concatenation's parts)."""
        if self.rule != "carry" or len(self.inputs) < 2:
            return tuple(i == 0 for i in range(len(self.inputs)))
        if self.core.op is not OpKind.NODE:
            return tuple(True for _ in self.inputs)
        out = self.core.out_shapes[0]
        return tuple(
            len(self.core.operands[k].shape) >= 2
            and len(out) >= 2
            and self.core.operands[k].shape[1] == out[1]
            and out[1] > 1
            for k in self.operand_index
        )

    def describe(self) -> str:
        return " | ".join(s.describe() for s in self.specs) + f"  [{self.name}]"


@functools.lru_cache(maxsize=65536)
def build_specs(
    core: LayerSpec, activation: Activation, residual_add: bool
) -> tuple[LayerSpec, ...]:
    """The specs the runtime executes for a unit (cached: the engine asks for the same ones
    many times).

    A residual add is fused into the conv, with the activation after it.
    """
    if not residual_add and activation is Activation.NONE:
        return (core,)
    return (_with(core, activation, residual_add),)


def _with(core: LayerSpec, activation: Activation, residual: bool) -> LayerSpec:
    """`core` with activation and residual set (dataclasses.replace, without its overhead).
    By keyword: a field added to LayerSpec later cannot shift the others."""
    c = core
    return LayerSpec(
        op=c.op,
        input_shape=c.input_shape,
        out_channels=c.out_channels,
        kernel=c.kernel,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=c.groups,
        bias=c.bias,
        batch_norm=c.batch_norm,
        activation=activation,
        residual=residual,
    )


def unit_specs(units: Sequence[FusionUnit]) -> list[LayerSpec]:
    """All specs of `units`, in execution order."""
    return [spec for unit in units for spec in unit.specs]


# -- what fuses -----------------------------------------------------------------------------------

# Activations ONNX Runtime runs inside the unit before them (fused or in the same small graph).
_ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: Activation.RELU,
    nn.ReLU6: Activation.RELU6,
    nn.Hardswish: Activation.HARDSWISH,
    nn.Sigmoid: Activation.SIGMOID,
    nn.Hardsigmoid: Activation.HARDSIGMOID,
    nn.SiLU: Activation.SILU,
}
_ACTIVATION_FUNCTIONS: dict[Any, Activation] = {
    F.relu: Activation.RELU,
    torch.relu: Activation.RELU,
    torch.relu_: Activation.RELU,
    F.relu6: Activation.RELU6,
    F.hardswish: Activation.HARDSWISH,
    torch.sigmoid: Activation.SIGMOID,
    F.sigmoid: Activation.SIGMOID,
    F.hardsigmoid: Activation.HARDSIGMOID,
    F.silu: Activation.SILU,
}
_ACTIVATION_METHODS: dict[str, Activation] = {
    "relu": Activation.RELU,
    "relu_": Activation.RELU,
    "sigmoid": Activation.SIGMOID,
    "sigmoid_": Activation.SIGMOID,
}
# Cost nothing at inference (ORT removes them).
_FREE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
)
_FREE_FUNCTIONS: set[Any] = {F.dropout, F.dropout2d}
_FREE_METHODS = {"contiguous", "clone", "detach"}
# Only relabel the tensor: free when they keep the channel axis, else a Reshape NODE.
_RESHAPE_FUNCTIONS: set[Any] = {torch.flatten, torch.squeeze, torch.reshape, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as",
                    "reshape_as"}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__"}


# -- the walk -------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A unit under construction."""

    core: LayerSpec
    modules: list[str]
    nodes: list[str]
    inputs: list[int]
    ports: list[int] = field(default_factory=list)
    scales: list[int] = field(default_factory=list)
    operand_index: list[int] = field(default_factory=list)
    rule: ChannelRule = "own"
    carry_from: int = 0
    out_channels: list[int] = field(default_factory=list)  # per output port, as traced
    note: str = ""
    activation: Activation = Activation.NONE
    residual_add: bool = False
    batch_norm_open: bool = False  # conv whose output nothing has consumed yet
    in_scale: int = 1
    is_output: bool = False


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the tensor itself (not only its shape)."""
    return [u for u in node.users
            if shape_of(u) is not None or shapes_of(u) is not None or u.op == "output"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _symmetric_padding(
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    declared: Any,
    at: str,
) -> tuple[int, int]:
    """The symmetric padding that reproduces the observed output size.

    Declared integer padding is used when it explains the output; otherwise ("same" padding,
    EfficientNet's static/dynamic same-padding convs, a folded ZeroPad2d, a ceil-mode pool) the
    padding is inferred from the shapes. Asymmetric "same" padding (total odd) becomes the
    symmetric pad with the same output size: what ORT runs differs by one row/column of zeros.
    """
    pads: list[int] = []
    for axis in range(2):
        args = (kernel[axis], stride[axis])
        if isinstance(declared, tuple) and all(isinstance(p, int) for p in declared):
            p0 = int(declared[axis])
            if _window_out(in_hw[axis], *args, p0, dilation[axis]) == out_hw[axis]:
                pads.append(p0)
                continue
        total = max(
            (out_hw[axis] - 1) * stride[axis]
            + dilation[axis] * (kernel[axis] - 1)
            + 1
            - in_hw[axis],
            0,
        )
        candidates = [(total + 1) // 2, total // 2, *range(0, dilation[axis] * kernel[axis] + 1)]
        for p in candidates:
            if _window_out(in_hw[axis], *args, p, dilation[axis]) == out_hw[axis]:
                pads.append(p)
                break
        else:
            raise UnsupportedLayerError(
                f"{at}: no symmetric padding maps input {in_hw} to output {out_hw}"
            )
    return (pads[0], pads[1])


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


class _Walker:
    """Walks a shape-annotated fx graph in execution order and builds the fusion units."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.drafts: list[_Draft] = []
        self.value: dict[fx.Node, int] = {}  # tensor node -> producing unit (or INPUT_SOURCE)
        self.port: dict[fx.Node, int] = {}  # tensor node -> output index of its unit
        self.tail: dict[int, fx.Node] = {}  # unit -> node holding its current output
        self.padding: dict[fx.Node, tuple[fx.Node, tuple[int, ...]]] = {}  # zero-pad nodes
        self.input_channels = 1

    # -- helpers ---------------------------------------------------------------------------
    def _src(self, node: Any, user: fx.Node) -> int:
        if not isinstance(node, fx.Node) or node not in self.value:
            raise UnsupportedLayerError(f"{where(user)}: input {node!r} is not a traced tensor")
        return self.value[node]

    def _channels(self, src: int, port: int) -> int:
        """Channel count of a producer's output (the network input's for INPUT_SOURCE)."""
        if src == INPUT_SOURCE:
            return self.input_channels
        d = self.drafts[src]
        return d.out_channels[port] if d.out_channels else _out_channels(d)

    def _new(self, node: fx.Node, draft: _Draft) -> int:
        if not draft.ports:
            draft.ports = [0] * len(draft.inputs)
        if not draft.scales:
            draft.scales = [1] * len(draft.inputs)
        self.drafts.append(draft)
        idx = len(self.drafts) - 1
        self.value[node] = idx
        self.port[node] = 0
        self.tail[idx] = node
        return idx

    def _fusable_into(self, node: fx.Node, arg: Any) -> int | None:
        """The unit `node` may fuse into: `arg` is that unit's tail and `node` its only user."""
        if not isinstance(arg, fx.Node) or arg not in self.value:
            return None
        idx = self.value[arg]
        if idx == INPUT_SOURCE or self.tail.get(idx) is not arg:
            return None
        if _data_users(arg) != [node]:
            return None
        return idx

    def _extend(self, node: fx.Node, idx: int, module: str | None) -> None:
        draft = self.drafts[idx]
        if module is not None:
            draft.modules.append(module)
        draft.nodes.append(node.name)
        self.value[node] = idx
        self.port[node] = 0
        self.tail[idx] = node

    # -- the walk --------------------------------------------------------------------------
    def run(self) -> list[FusionUnit]:
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                placeholders += 1
                if placeholders > 1:
                    raise UnsupportedLayerError("models with more than one input are not supported")
                self.value[node] = INPUT_SOURCE
                self.port[node] = 0
                shape = shape_of(node)
                self.input_channels = shape[1] if shape and len(shape) > 1 else 1
            elif node.op == "output":
                self._mark_outputs(node)
            elif node.op == "get_attr" or (shape_of(node) is None and shapes_of(node) is None):
                continue  # parameters read by functional code, shape arithmetic
            elif node.op == "call_module":
                self._module(node, self.modules[str(node.target)])
            elif node.op in ("call_function", "call_method"):
                self._function(node)
        return [self._finish(i, d) for i, d in enumerate(self.drafts)]

    def _finish(self, index: int, d: _Draft) -> FusionUnit:
        inputs = tuple(d.inputs)
        return FusionUnit(
            index=index,
            core=d.core,
            activation=d.activation,
            residual_add=d.residual_add,
            modules=tuple(d.modules),
            nodes=tuple(d.nodes),
            source=inputs[0] if inputs else INPUT_SOURCE,
            operand=inputs[1] if len(inputs) > 1 and d.core.op is not OpKind.NODE else None,
            in_scale=d.in_scale,
            is_output=d.is_output,
            inputs=inputs,
            ports=tuple(d.ports),
            scales=tuple(d.scales),
            operand_index=tuple(d.operand_index),
            rule=d.rule,
            carry_from=d.carry_from,
            out_channels_by_port=tuple(d.out_channels) or (_out_channels(d),),
            note=d.note,
        )

    def _mark_outputs(self, node: fx.Node) -> None:
        outs: list[Any] = []

        def collect(a: Any) -> None:
            if isinstance(a, fx.Node):
                outs.append(a)
            elif isinstance(a, (tuple, list)):
                for x in a:
                    collect(x)
            elif isinstance(a, dict):
                for x in a.values():
                    collect(x)

        collect(node.args)
        for out in outs:
            idx = self.value.get(out)
            if idx is not None and idx >= 0:
                self.drafts[idx].is_output = True

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Conv2d):
            self._conv(node, m, name)
        elif isinstance(m, nn.Linear):
            self._linear(node, m, name)
        elif isinstance(m, nn.BatchNorm2d) and self._bn_fusable(node, x):
            idx = self._fusable_into(node, x)
            assert idx is not None
            d = self.drafts[idx]
            d.core = dataclasses.replace(d.core, batch_norm=True)
            d.batch_norm_open = False
            self._extend(node, idx, name)
        elif type(m) in _ACTIVATION_MODULES and self._act_fusable(node, x):
            self._activation(node, _ACTIVATION_MODULES[type(m)], x, name)
        elif (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)
              and self._act_fusable(node, x)):
            self._activation(node, Activation.RELU6, x, name)
        elif isinstance(m, nn.SiLU):
            self._silu(node, x, name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            self._pool(node, m, name)
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            self._adaptive_pool(node, isinstance(m, nn.AdaptiveMaxPool2d), name)
        elif isinstance(m, _FREE_MODULES):
            self._free(node, x, transparent=True)
        elif isinstance(m, nn.Flatten):
            self._reshape(node, x)
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)) and float(getattr(m, "value", 0)) == 0:
            self._zero_pad(node, x, tuple(int(p) for p in m.padding))
        elif not self._node(node, m, name):
            if aliases_input(node):
                self._free(node, x, transparent=True)
                return
            raise UnsupportedLayerError(
                f"{where(node)} ({type(m).__name__}) has no LayerSpec equivalent; supported: "
                f"Conv2d, BatchNorm2d, Linear, pooling, Flatten, Dropout, Identity, and "
                f"{', '.join(supported_ops())}; rewrite it with these or leave it out"
            )

    def _function(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        x = node.args[0] if node.args else node.kwargs.get("input")
        if (not is_method and target in _ADD_FUNCTIONS) or (is_method and target in _ADD_METHODS):
            if not self._add(node):
                self._node_or_refuse(node)
        elif (not is_method and target in _ACTIVATION_FUNCTIONS) or (
            is_method and target in _ACTIVATION_METHODS
        ):
            act = _ACTIVATION_METHODS[str(target)] if is_method else _ACTIVATION_FUNCTIONS[target]
            if self._act_fusable(node, x):
                self._activation(node, act, x, None)
            elif act is Activation.SILU:
                self._silu(node, x, None)
            else:
                self._node_or_refuse(node)
        elif self._is_relu6_call(node) and self._act_fusable(node, x):
            self._activation(node, Activation.RELU6, x, None)
        elif (not is_method and target in _FREE_FUNCTIONS) or (
            is_method and target in _FREE_METHODS
        ):
            self._free(node, x, transparent=True)
        elif (not is_method and target in _RESHAPE_FUNCTIONS) or (
            is_method and target in _RESHAPE_METHODS
        ):
            self._reshape(node, x)
        elif not is_method and target in (F.max_pool2d, F.avg_pool2d):
            self._functional_pool(node)
        elif not is_method and target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            self._adaptive_pool(node, target is F.adaptive_max_pool2d, None)
        elif (is_method and target == "mean") or (not is_method and target is torch.mean):
            self._mean(node)
        elif not is_method and target is F.pad:
            self._functional_pad(node)
        elif not is_method and target is operator.getitem:
            self._getitem(node)
        else:
            self._node_or_refuse(node)

    def _node_or_refuse(self, node: fx.Node) -> None:
        if self._node(node, None, None):
            return
        if aliases_input(node) and node.args:
            self._free(node, node.args[0], transparent=True)
            return
        raise UnsupportedLayerError(
            f"{where(node)} has no LayerSpec equivalent (supported functional ops: "
            f"{', '.join(supported_ops())}, pooling, mean over H and W, flatten/view/reshape, "
            f"zero padding); rewrite it with these or leave it out"
        )

    # -- NODE units ------------------------------------------------------------------------
    def _node(self, node: fx.Node, module: nn.Module | None, name: str | None) -> bool:
        """A NODE unit for `node` from the op registry; False when the registry lacks it."""
        draft = node_draft(node, module)
        if draft is None:
            return False
        self._node_unit(node, draft, name)
        return True

    def _node_unit(self, node: fx.Node, draft: NodeDraft, name: str | None) -> int:
        operands: list[NodeOperand] = []
        inputs: list[int] = []
        ports: list[int] = []
        scales: list[int] = []
        operand_index: list[int] = []
        for k, op in enumerate(draft.operands):
            if isinstance(op, NodeOperand):
                operands.append(op)
                continue
            shape = shape_of(op)
            assert shape is not None
            if op in self.value:
                src, port = self.value[op], self.port.get(op, 0)
                operands.append(NodeOperand.input(shape))
                channels = self._channels(src, port)
                scale = shape[1] // channels if len(shape) > 1 and channels else 1
                if len(shape) > 1 and channels and shape[1] % channels:
                    scale = 0  # not a whole multiple: the shapes cannot follow (fixed below)
            else:  # computed from parameters or buffers only
                src, port, scale = CONSTANT_SOURCE, 0, 1
                operands.append(NodeOperand.weight(shape))
            inputs.append(src)
            ports.append(port)
            scales.append(scale)
            operand_index.append(k)
        if not inputs or operands[0].kind != "input":
            # ONNX and LayerSpec.node want a graph input first; a constant-only op folds away
            if not any(o.kind == "input" for o in operands):
                raise UnsupportedLayerError(f"{where(node)}: reads no tensor of the network")
            first = next(k for k, o in enumerate(operands) if o.kind == "input")
            raise UnsupportedLayerError(
                f"{where(node)}: its tensor operand is operand {first}; only ops whose first "
                f"operand is a network tensor are supported")
        try:
            spec = LayerSpec.node(draft.op_type, operands, draft.out_shapes, draft.attributes)
        except InvalidConfigError as exc:
            raise UnsupportedLayerError(f"{where(node)}: {exc}") from None
        rule, carry_from = _node_rule(spec, operand_index, scales)
        out_channels = [self._node_out_channels(rule, carry_from, inputs, ports, shape)
                        for shape in spec.out_shapes]
        idx = self._new(node, _Draft(
            core=spec, modules=[name] if name else [], nodes=[node.name], inputs=inputs,
            ports=ports, scales=scales, operand_index=operand_index, rule=rule,
            carry_from=carry_from, out_channels=out_channels))
        logger.debug("NODE unit %d: %s (%s)", idx, spec.describe(), rule)
        return idx

    def _node_out_channels(self, rule: ChannelRule, carry_from: int, inputs: list[int],
                           ports: list[int], shape: tuple[int, ...]) -> int:
        if rule == "carry":
            return self._channels(inputs[carry_from], ports[carry_from])
        if rule == "concat":
            return sum(self._channels(s, p) for s, p in zip(inputs, ports, strict=True))
        return shape[1] if len(shape) > 1 else 1

    def _silu(self, node: fx.Node, x: Any, module: str | None) -> None:
        """SiLU that no unit absorbs: Sigmoid, then Mul with the input (what torch exports)."""
        if self._act_fusable(node, x):
            self._activation(node, Activation.SILU, x, module)
            return
        if not isinstance(x, fx.Node) or x not in self.value:
            raise UnsupportedLayerError(f"{where(node)}: input {x!r} is not a traced tensor")
        shape = shape_of(node)
        assert shape is not None
        self._node_unit(node, NodeDraft("Sigmoid", (x,), (shape,)), module)
        mul = NodeDraft("Mul", (x, node), (shape,))
        self._node_unit(node, mul, None)  # rebinds `node` to the Mul unit

    def _getitem(self, node: fx.Node) -> None:
        """One part of a split (`a, b = x.chunk(2, 1)`); indexing a tensor is not supported."""
        seq, index = node.args[0], node.args[1]
        if (isinstance(seq, fx.Node) and seq in self.value and shapes_of(seq) is not None
                and isinstance(index, int)):
            self.value[node] = self.value[seq]
            self.port[node] = index % len(shapes_of(seq) or ())
            return
        raise UnsupportedLayerError(
            f"{where(node)}: indexing or slicing a tensor ({seq}[{index}]) is not supported; "
            f"use torch.split/chunk for channel groups")

    # -- reshapes --------------------------------------------------------------------------
    def _reshape(self, node: fx.Node, x: Any) -> None:
        """Free when it keeps the channel axis (same shape, a flatten of (N, C, ...) into (N,
        C*...), or (N, C) kept in front) and states no size that pruning would change;
        otherwise a Reshape NODE whose shape is fixed."""
        si, so = shape_of(x), shape_of(node)
        assert so is not None
        if si is None or not isinstance(x, fx.Node):
            raise UnsupportedLayerError(f"{where(node)}: its input is not a traced tensor")
        pinned = _literal_sizes(node, si)
        keeps_axis = (
            so == si
            or (len(si) >= 2 and len(so) == 2 and so[0] == si[0] and so[1] == _prod(si[1:]))
            or (len(si) >= 2 and len(so) >= 2 and so[:2] == si[:2])
        )
        if keeps_axis and not pinned:
            self._free(node, x, transparent=False)
            return
        idx = self._node_unit(node, reshape_draft(node, x), None)
        target = getattr(node.target, "__name__", node.target)
        if keeps_axis:
            sizes = ", ".join(str(p) for p in pinned)
            why = (f"reshaped by {target}() with the constant size {sizes} at {node.name!r}; "
                   f"compute the shape from the tensor (torch.flatten(x, 1) or "
                   f"x.view(x.size(0), -1)) to let NetAdapt prune it")
        else:
            why = (f"reshaped from {list(si)} to {list(so)} at {node.name!r}, which splits or "
                   f"moves the channel axis (a channel shuffle)")
        logger.debug("unit %d is a fixed Reshape: %s", idx, why)
        self.drafts[idx].rule = "fixed"
        self.drafts[idx].note = why

    # -- fixed kinds -----------------------------------------------------------------------
    def _input(self, node: fx.Node, x: Any) -> tuple[int, int, tuple[int, ...]]:
        """(source unit, its port, input shape) of a conv/pool input (through zero padding)."""
        if isinstance(x, fx.Node) and x in self.padding:
            pre, _ = self.padding[x]
            shape = shape_of(pre)
            assert shape is not None
            return self._src(pre, node), self.port.get(pre, 0), shape
        shape = shape_of(x)
        if shape is None:
            raise UnsupportedLayerError(f"{where(node)}: its input has no known shape")
        return self._src(x, node), self.port.get(x, 0), shape

    def _conv(self, node: fx.Node, m: nn.Conv2d, name: str) -> None:
        at = where(node)
        src, port, in_shape = self._input(node, node.args[0])
        out_shape = shape_of(node)
        assert out_shape is not None
        if len(in_shape) != 4:
            raise UnsupportedLayerError(f"{at}: Conv2d input must be NCHW, got {in_shape}")
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{at}: padding_mode={m.padding_mode!r} is not supported; use zeros"
            )
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        padding = _symmetric_padding(
            (in_shape[2], in_shape[3]),
            (out_shape[2], out_shape[3]),
            kernel,
            stride,
            dilation,
            m.padding if not isinstance(m.padding, str) else None,
            at,
        )
        if in_shape[1] != m.in_channels or out_shape[1] != m.out_channels:
            raise UnsupportedLayerError(
                f"{at}: traced shapes {in_shape} -> {out_shape} disagree with the module's "
                f"channels {m.in_channels} -> {m.out_channels}"
            )
        core = LayerSpec.create(
            op=OpKind.CONV2D,
            input_shape=in_shape,
            out_channels=m.out_channels,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=m.groups,
            bias=m.bias is not None,
        )
        if core.output_shape() != out_shape:
            raise UnsupportedLayerError(
                f"{at}: computed output {core.output_shape()} differs from traced {out_shape}"
            )
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        self._new(
            node,
            _Draft(core=core, modules=[name], nodes=[node.name], inputs=[src], ports=[port],
                   rule="carry" if depthwise else "own", batch_norm_open=True),
        )

    def _linear(self, node: fx.Node, m: nn.Linear, name: str) -> None:
        at = where(node)
        x = node.args[0]
        shape = shape_of(x)
        if shape is None or len(shape) != 2:
            raise UnsupportedLayerError(
                f"{at}: Linear needs a (N, features) input, got {shape}; flatten it first"
            )
        src = self._src(x, node)
        port = self.port.get(x, 0)  # type: ignore[arg-type]
        src_channels = self._channels(src, port)
        if shape[1] % src_channels:
            raise UnsupportedLayerError(
                f"{at}: {shape[1]} input features are not a whole multiple of the "
                f"{src_channels} channels that feed it"
            )
        core = LayerSpec.create(
            op=OpKind.LINEAR,
            input_shape=shape,
            out_channels=m.out_features,
            bias=m.bias is not None,
        )
        scale = shape[1] // src_channels
        self._new(
            node,
            _Draft(core=core, modules=[name], nodes=[node.name], inputs=[src], ports=[port],
                   scales=[scale], in_scale=scale),
        )

    def _bn_fusable(self, node: fx.Node, x: Any) -> bool:
        idx = self._fusable_into(node, x)
        return idx is not None and self.drafts[idx].batch_norm_open

    def _act_fusable(self, node: fx.Node, x: Any) -> bool:
        idx = self._fusable_into(node, x)
        if idx is None:
            return False
        d = self.drafts[idx]
        return (
            d.core.op in (OpKind.CONV2D, OpKind.LINEAR, OpKind.ADD)
            and d.activation is Activation.NONE
        )

    def _activation(self, node: fx.Node, act: Activation, x: Any, module: str | None) -> None:
        idx = self._fusable_into(node, x)
        assert idx is not None
        d = self.drafts[idx]
        d.activation = act
        d.batch_norm_open = False
        self._extend(node, idx, module)

    def _is_relu6_call(self, node: fx.Node) -> bool:
        """F.hardtanh(x, 0, 6), torch.clamp(x, 0, 6), x.clamp(0, 6)."""
        t = node.target
        if node.op == "call_method" and t in ("clamp", "clamp_", "clip"):
            pass
        elif node.op == "call_function" and t in (F.hardtanh, torch.clamp, torch.clip):
            pass
        else:
            return False
        lo: Any = node.kwargs.get("min", node.kwargs.get("min_val"))
        hi: Any = node.kwargs.get("max", node.kwargs.get("max_val"))
        if len(node.args) >= 3:
            lo, hi = node.args[1], node.args[2]
        if not isinstance(lo, (int, float)) or not isinstance(hi, (int, float)):
            return False
        return (float(lo), float(hi)) == (0.0, 6.0)

    def _add(self, node: fx.Node) -> bool:
        """An add of two equal NCHW tensors: fused into a conv, or an ADD unit. False for any
        other add (broadcast, a scalar, another rank), which becomes a NODE."""
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None or sa != sb or node.kwargs.get("alpha", 1) != 1:
            return False
        if len(sa) != 4 or a not in self.value or b not in self.value:
            return False
        candidates = []
        for arg in (a, b):
            idx = self._fusable_into(node, arg)
            if idx is None:
                continue
            d = self.drafts[idx]
            if (
                d.core.op is OpKind.CONV2D
                and d.activation is Activation.NONE
                and not d.residual_add
            ):
                candidates.append((idx, arg))
        if candidates:
            idx, arg = max(candidates, key=lambda c: c[0])  # the later conv (main branch)
            other = b if arg is a else a
            d = self.drafts[idx]
            d.residual_add = True
            d.batch_norm_open = False
            d.inputs.append(self._src(other, node))
            d.ports.append(self.port.get(other, 0))  # type: ignore[arg-type]
            d.scales.append(1)
            self._extend(node, idx, None)
            return True
        core = LayerSpec.create(op=OpKind.ADD, input_shape=sa)
        self._new(
            node,
            _Draft(
                core=core,
                modules=[],
                nodes=[node.name],
                inputs=[self._src(a, node), self._src(b, node)],
                ports=[self.port.get(a, 0), self.port.get(b, 0)],  # type: ignore[arg-type]
                rule="carry",
            ),
        )
        return True

    def _pool(self, node: fx.Node, m: nn.MaxPool2d | nn.AvgPool2d, name: str) -> None:
        is_max = isinstance(m, nn.MaxPool2d)
        dilation = _pair(m.dilation) if isinstance(m, nn.MaxPool2d) else (1, 1)
        stride = m.stride if m.stride is not None else m.kernel_size
        self._pool_unit(
            node,
            is_max,
            _pair(m.kernel_size),
            _pair(stride),  # type: ignore[arg-type]
            m.padding,
            dilation,
            name,
        )  # type: ignore[arg-type]

    def _functional_pool(self, node: fx.Node) -> None:
        is_max = node.target is F.max_pool2d
        names = ["input", "kernel_size", "stride", "padding"] + (["dilation"] if is_max else [])
        vals: dict[str, Any] = dict(zip(names, node.args, strict=False))
        vals.update({k: v for k, v in node.kwargs.items() if k in names})
        kernel = _pair(vals["kernel_size"])
        stride = _pair(vals.get("stride") or kernel)
        self._pool_unit(
            node,
            is_max,
            kernel,
            stride,
            vals.get("padding", 0),
            _pair(vals.get("dilation", 1)),
            None,
        )

    def _pool_unit(
        self,
        node: fx.Node,
        is_max: bool,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        declared_padding: Any,
        dilation: tuple[int, int],
        module: str | None,
    ) -> None:
        at = where(node)
        src, port, in_shape = self._input(node, node.args[0])
        out_shape = shape_of(node)
        assert out_shape is not None
        if len(in_shape) != 4:
            raise UnsupportedLayerError(f"{at}: pooling input must be NCHW, got {in_shape}")
        padding = _symmetric_padding(
            (in_shape[2], in_shape[3]),
            (out_shape[2], out_shape[3]),
            kernel,
            stride,
            dilation,
            _pair(declared_padding),
            at,
        )
        op = OpKind.MAX_POOL if is_max else OpKind.AVG_POOL
        try:
            core = LayerSpec.create(
                op=op,
                input_shape=in_shape,
                kernel=kernel,
                stride=stride,
                padding=padding,
                dilation=dilation,
            )
        except InvalidConfigError as exc:
            raise UnsupportedLayerError(f"{at}: {exc}") from None
        self._new(
            node,
            _Draft(core=core, modules=[module] if module else [], nodes=[node.name],
                   inputs=[src], ports=[port], rule="carry"),
        )

    def _adaptive_pool(self, node: fx.Node, is_max: bool, module: str | None) -> None:
        at = where(node)
        x = node.args[0]
        in_shape, out_shape = shape_of(x), shape_of(node)
        assert out_shape is not None
        if in_shape is None or len(in_shape) != 4:
            raise UnsupportedLayerError(f"{at}: adaptive pooling needs an NCHW input")
        if out_shape[2:] == (1, 1) and not is_max:
            core = LayerSpec.create(op=OpKind.GLOBAL_AVG_POOL, input_shape=in_shape)
            self._new(
                node,
                _Draft(
                    core=core,
                    modules=[module] if module else [],
                    nodes=[node.name],
                    inputs=[self._src(x, node)],
                    ports=[self.port.get(x, 0)],  # type: ignore[arg-type]
                    rule="carry",
                ),
            )
            return
        h, w = in_shape[2], in_shape[3]
        oh, ow = out_shape[2], out_shape[3]
        if h % oh or w % ow:
            raise UnsupportedLayerError(
                f"{at}: adaptive pooling {h}x{w} -> {oh}x{ow} is not a fixed window"
            )
        k = (h // oh, w // ow)
        self._pool_unit(node, is_max, k, k, 0, (1, 1), module)

    def _mean(self, node: fx.Node) -> None:
        x = node.args[0]
        in_shape = shape_of(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if in_shape is None or len(in_shape) != 4 or dims is None:
            raise UnsupportedLayerError(f"{where(node)}: only a mean over H and W is supported")
        dim_list = [dims] if isinstance(dims, int) else list(dims)  # type: ignore[arg-type]
        if sorted(int(d) % 4 for d in dim_list) != [2, 3]:
            raise UnsupportedLayerError(f"{where(node)}: only a mean over H and W is supported")
        core = LayerSpec.create(op=OpKind.GLOBAL_AVG_POOL, input_shape=in_shape)
        self._new(node, _Draft(core=core, modules=[], nodes=[node.name],
                               inputs=[self._src(x, node)],
                               ports=[self.port.get(x, 0)],  # type: ignore[arg-type]
                               rule="carry"))

    def _free(self, node: fx.Node, x: Any, transparent: bool) -> None:
        """Reshapes, dropout, identity: the output belongs to the input's unit. Only dropout,
        identity and contiguous are transparent to fusion (ORT drops them); after a reshape
        nothing more fuses into the unit."""
        idx = self._src(x, node)
        self.value[node] = idx
        self.port[node] = self.port.get(x, 0)
        if transparent and idx >= 0 and isinstance(x, fx.Node):
            if self.tail.get(idx) is x and _data_users(x) == [node]:
                self.tail[idx] = node

    def _zero_pad(self, node: fx.Node, x: Any, pads: tuple[int, ...]) -> None:
        users = _data_users(node)
        ok = (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(
                self.modules.get(str(users[0].target)), (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
            )
        )
        if not ok or not isinstance(x, fx.Node):
            raise UnsupportedLayerError(
                f"{where(node)}: zero padding is supported only right before a conv or pool"
            )
        self.value[node] = self._src(x, node)
        self.port[node] = self.port.get(x, 0)
        self.padding[node] = (x, pads)

    def _functional_pad(self, node: fx.Node) -> None:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
        if mode != "constant" or (value or 0) != 0 or not isinstance(pads, (list, tuple)):
            raise UnsupportedLayerError(f"{where(node)}: only zero padding is supported")
        self._zero_pad(node, node.args[0], tuple(int(p) for p in pads))  # type: ignore[arg-type]


def _literal_sizes(node: fx.Node, in_shape: tuple[int, ...]) -> list[int]:
    """Sizes a view/reshape states as constants that pruning would have to change: any literal
    but -1, 1 and the batch size in front (`x.view(-1, 256)` pins 256; `x.view(x.size(0), -1)`
    and `torch.flatten(x, 1)` pin nothing)."""
    if node.target not in ("view", "reshape", torch.reshape):
        return []
    sizes: Any = list(node.args[1:]) if node.op == "call_method" else [node.args[1]]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    pinned = []
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s not in (-1, 1) and not (i == 0 and s == in_shape[0]):
            pinned.append(s)
    return pinned


def _node_rule(spec: LayerSpec, operand_index: Sequence[int],
               scales: Sequence[int]) -> tuple[ChannelRule, int]:
    """How a NODE's output channels follow its inputs, read from its shapes: "carry" when an
    input has the output's shape (elementwise ops, broadcast gates), "concat" for a Concat on
    axis 1 of whole channels, else "fixed"."""
    outs = spec.out_shapes
    if any(s == 0 for s in scales) or len(outs) != 1 or len(outs[0]) < 2:
        return "fixed", 0
    shapes = [spec.operands[k].shape for k in operand_index]
    if spec.node_op == "Concat":
        if dict(spec.attributes).get("axis") == 1 and all(s == 1 for s in scales):
            return "concat", 0
        return "fixed", 0
    for j, shape in enumerate(shapes):
        if shape == outs[0] and spec.operands[operand_index[j]].kind == "input":
            return "carry", j
    return "fixed", 0


def _out_channels(d: _Draft) -> int:
    shape = build_specs(d.core, d.activation, d.residual_add)[-1].output_shape()
    return shape[1] if len(shape) > 1 else 1


def extract_units(model: nn.Module, input_shape: Sequence[int]) -> list[FusionUnit]:
    """The fusion units of `model` for an input of `input_shape` (N, C, H, W), in execution order.

    The model is traced in eval mode on a copy; the model itself is not changed.

    Raises:
        UnsupportedLayerError: a layer cannot be traced or has no `LayerSpec` equivalent; the
            message names it.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4 or min(shape) <= 0:
        raise ValueError(f"input_shape must be (N, C, H, W) with positive sizes, got {shape}")
    frozen = copy.deepcopy(model).eval()
    example = torch.zeros(shape)  # (N, C, H, W); values do not matter, only shapes
    try:
        gm = trace(frozen, example)
    except TraceError as exc:
        raise UnsupportedLayerError(str(exc)) from exc
    units = _Walker(gm).run()
    logger.debug("extracted %d fusion units from %s", len(units), type(model).__name__)
    return units
