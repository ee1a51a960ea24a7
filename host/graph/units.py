"""Fusion units: the sequence of `LayerSpec`s a torch model runs as, once exported to ONNX and
optimised by ONNX Runtime.

`extract_units` traces the model with torch.fx (every `nn.Conv2d`/`nn.Linear`/`nn.BatchNorm2d`/
pooling/activation instance is a leaf, so `nn.Conv2d` subclasses such as EfficientNet's
"static same padding" convs stay one node), propagates real shapes with an example input and
walks the graph in execution order, fusing as the runtime does:

* Conv2d [+ BatchNorm2d] [+ residual add that consumes the conv output directly] [+ activation]
  (relu / relu6 / hardswish; the activation of a residual unit comes after the add);
* Linear [+ activation];
* MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1) / mean over H, W -> global_avg_pool;
* an add that no conv absorbs -> a standalone `add` unit [+ activation].

Dropout, Identity, flatten/view/reshape and shape queries cost nothing and are skipped. Anything
else (concatenation, multiplication, sigmoid, SiLU, ...) raises `UnsupportedLayerError` naming
the layer, because no `LayerSpec` can describe it.

Each `FusionUnit` also records where its input comes from (`source`), so that the channel
counts of a pruned network can be derived without tracing again (see `host.graph.groups`).
A residual add that consumes a conv's output directly is fused into that conv's unit
(`residual=True`), as ONNX Runtime's ENABLE_ALL level fuses Conv+Add(+activation), whatever the
conv's input shape (e.g. MobileNetV2's 1x1 projection).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from device_server.spec import Activation, LayerSpec, OpKind

__all__ = [
    "UnsupportedLayerError",
    "FusionUnit",
    "INPUT_SOURCE",
    "extract_units",
    "unit_specs",
    "build_specs",
]

logger = logging.getLogger(__name__)

_SHAPE = "netadapt_shape"  # node.meta key of traced tensor shapes

INPUT_SOURCE = -1
"""`FusionUnit.source` of a unit that reads the network input."""


class UnsupportedLayerError(ValueError):
    """The model holds a layer or op that no `LayerSpec` can describe, or that cannot be traced.

    The message names the layer (module path or graph node) and what to change.
    """


@dataclass(frozen=True)
class FusionUnit:
    """One fusion unit of a traced model.

    `core` is the main op with neither activation nor residual; `activation` is applied last
    (after the residual add when `residual_add`). `specs` is what the runtime executes: one
    spec, or (conv, add) when a residual add could not be fused into the conv.
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
        return self.core.input_shape[1]

    @property
    def out_channels(self) -> int:
        return self.specs[-1].output_shape()[1]

    @property
    def is_depthwise(self) -> bool:
        c = self.core
        return (
            c.op is OpKind.CONV2D and c.groups == c.in_channels == c.out_channels and c.groups > 1
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
    """`core` with activation and residual set (dataclasses.replace, without its overhead)."""
    c = core
    return LayerSpec(
        c.op,
        c.input_shape,
        c.out_channels,
        c.kernel,
        c.stride,
        c.padding,
        c.dilation,
        c.groups,
        c.bias,
        c.batch_norm,
        activation,
        residual,
    )


def unit_specs(units: Sequence[FusionUnit]) -> list[LayerSpec]:
    """All specs of `units`, in execution order."""
    return [spec for unit in units for spec in unit.specs]


# -- op registry ----------------------------------------------------------------------------------

_ACTIVATION_MODULES: dict[type[nn.Module], Activation] = {
    nn.ReLU: Activation.RELU,
    nn.ReLU6: Activation.RELU6,
    nn.Hardswish: Activation.HARDSWISH,
}
_ACTIVATION_FUNCTIONS: dict[Any, Activation] = {
    F.relu: Activation.RELU,
    torch.relu: Activation.RELU,
    torch.relu_: Activation.RELU,
    F.relu6: Activation.RELU6,
    F.hardswish: Activation.HARDSWISH,
}
_ACTIVATION_METHODS: dict[str, Activation] = {
    "relu": Activation.RELU,
    "relu_": Activation.RELU,
}
# Cost nothing at inference (ORT removes them or they only relabel the tensor).
_FREE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Flatten,
)
_FREE_FUNCTIONS: set[Any] = {torch.flatten, F.dropout, torch.squeeze, torch.reshape}
_FREE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous", "view_as", "reshape_as"}
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__"}
_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    *_ACTIVATION_MODULES,
    nn.Hardtanh,
    *_FREE_MODULES,
)


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every conv/linear/BN/pool/activation instance (subclasses included)
    as one node, and remembers which module it was inside when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.module_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.module_path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.module_path.pop()


def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; re-raise with the layer
        where = tracer.module_path[-1] if tracer.module_path else "<top level>"
        raise UnsupportedLayerError(
            f"torch.fx cannot trace layer {where!r} ({type(exc).__name__}: {exc}); make its "
            f"forward free of data-dependent control flow, or use supported layers"
        ) from exc
    gm = fx.GraphModule(model, graph)
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.run(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward
        where = _where(prop.current) if prop.current is not None else "the model"
        first_line = (str(exc).splitlines() or [""])[0]
        raise UnsupportedLayerError(
            f"running {where} on an input of shape {tuple(example.shape)} failed: "
            f"{type(exc).__name__}: {first_line}"
        ) from exc
    return gm


class _ShapeProp(fx.Interpreter):
    """Runs the graph once and records each tensor result's shape in `node.meta[_SHAPE]`;
    remembers the node it is running, for error messages."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_SHAPE] = tuple(int(d) for d in result.shape)
        return result


# -- the walk -------------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A unit under construction."""

    core: LayerSpec
    modules: list[str]
    nodes: list[str]
    source: int
    activation: Activation = Activation.NONE
    residual_add: bool = False
    batch_norm_open: bool = False  # conv whose output nothing has consumed yet
    operand: int | None = None
    in_scale: int = 1
    is_output: bool = False


def _shape(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a tensor-valued node; None for non-tensors (sizes, tuples)."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(_SHAPE)
    return shape if isinstance(shape, tuple) else None


def _where(node: fx.Node) -> str:
    """The layer a node belongs to, for messages."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    stack = node.meta.get("nn_module_stack")
    inside = f" inside {list(stack)[-1]!r}" if stack else ""
    return f"op {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}){inside}"


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the tensor itself (not only its shape)."""
    return [u for u in node.users if _shape(u) is not None or u.op == "output"]


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
    where: str,
) -> tuple[int, int]:
    """The symmetric padding that reproduces the observed output size.

    Declared integer padding is used when it explains the output; otherwise ("same" padding,
    EfficientNet's static/dynamic same-padding convs, a folded ZeroPad2d) the padding is
    inferred from the shapes. Asymmetric "same" padding (total odd) becomes the symmetric pad
    with the same output size: what ORT runs differs by one row/column of zeros.
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
                f"{where}: no symmetric padding maps input {in_hw} to output {out_hw}"
            )
    return (pads[0], pads[1])


class _Walker:
    """Walks a shape-annotated fx graph in execution order and builds the fusion units."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.drafts: list[_Draft] = []
        self.value: dict[fx.Node, int] = {}  # tensor node -> producing unit (or INPUT_SOURCE)
        self.tail: dict[int, fx.Node] = {}  # unit -> node holding its current output
        self.padding: dict[fx.Node, tuple[fx.Node, tuple[int, ...]]] = {}  # zero-pad nodes

    # -- helpers ---------------------------------------------------------------------------
    def _src(self, node: Any, user: fx.Node) -> int:
        if not isinstance(node, fx.Node) or node not in self.value:
            raise UnsupportedLayerError(f"{_where(user)}: input {node!r} is not a traced tensor")
        return self.value[node]

    def _new(self, node: fx.Node, draft: _Draft) -> None:
        self.drafts.append(draft)
        idx = len(self.drafts) - 1
        self.value[node] = idx
        self.tail[idx] = node

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
            elif node.op == "output":
                self._mark_outputs(node)
            elif node.op == "get_attr" or _shape(node) is None:
                continue  # parameters read by functional code, shape arithmetic
            elif node.op == "call_module":
                self._module(node, self.modules[str(node.target)])
            elif node.op in ("call_function", "call_method"):
                self._function(node)
        return [self._finish(i, d) for i, d in enumerate(self.drafts)]

    def _finish(self, index: int, d: _Draft) -> FusionUnit:
        return FusionUnit(
            index=index,
            core=d.core,
            activation=d.activation,
            residual_add=d.residual_add,
            modules=tuple(d.modules),
            nodes=tuple(d.nodes),
            source=d.source,
            operand=d.operand,
            in_scale=d.in_scale,
            is_output=d.is_output,
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
            if idx is not None and idx != INPUT_SOURCE:
                self.drafts[idx].is_output = True

    def _module(self, node: fx.Node, m: nn.Module) -> None:
        name = str(node.target)
        where = _where(node)
        x = node.args[0] if node.args else None
        if isinstance(m, nn.Conv2d):
            self._conv(node, m, name)
        elif isinstance(m, nn.Linear):
            self._linear(node, m, name)
        elif isinstance(m, nn.BatchNorm2d):
            idx = self._fusable_into(node, x)
            d = self.drafts[idx] if idx is not None else None
            if d is None or not d.batch_norm_open:
                raise UnsupportedLayerError(
                    f"{where}: BatchNorm2d must directly follow a Conv2d whose output nothing "
                    f"else reads, so that it folds into the conv"
                )
            assert idx is not None
            d.core = dataclasses.replace(d.core, batch_norm=True)
            d.batch_norm_open = False
            self._extend(node, idx, name)
        elif type(m) in _ACTIVATION_MODULES:
            self._activation(node, _ACTIVATION_MODULES[type(m)], x, name)
        elif isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
            self._activation(node, Activation.RELU6, x, name)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            self._pool(node, m, name)
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            self._adaptive_pool(node, isinstance(m, nn.AdaptiveMaxPool2d), name)
        elif isinstance(m, _FREE_MODULES):
            self._free(node, x, transparent=not isinstance(m, nn.Flatten))
        elif isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)) and float(getattr(m, "value", 0)) == 0:
            self._zero_pad(node, x, tuple(int(p) for p in m.padding))
        else:
            raise UnsupportedLayerError(
                f"{where} ({type(m).__name__}) has no LayerSpec equivalent; supported: Conv2d, "
                f"BatchNorm2d after a conv, ReLU/ReLU6/Hardswish, Linear, Max/AvgPool2d, "
                f"AdaptiveAvgPool2d, Flatten, Dropout, Identity"
            )

    def _function(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        x = node.args[0] if node.args else None
        if (not is_method and target in _ADD_FUNCTIONS) or (is_method and target in _ADD_METHODS):
            self._add(node)
        elif (not is_method and target in _ACTIVATION_FUNCTIONS) or (
            is_method and target in _ACTIVATION_METHODS
        ):
            act = _ACTIVATION_METHODS[str(target)] if is_method else _ACTIVATION_FUNCTIONS[target]
            self._activation(node, act, x, None)
        elif self._is_relu6_call(node):
            self._activation(node, Activation.RELU6, x, None)
        elif (not is_method and target in _FREE_FUNCTIONS) or (
            is_method and target in _FREE_METHODS
        ):
            self._free(node, x, transparent=target in (F.dropout, "contiguous"))
        elif not is_method and target in (F.max_pool2d, F.avg_pool2d):
            self._functional_pool(node)
        elif not is_method and target in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            self._adaptive_pool(node, target is F.adaptive_max_pool2d, None)
        elif (is_method and target == "mean") or (not is_method and target is torch.mean):
            self._mean(node)
        elif not is_method and target is F.pad:
            self._functional_pad(node)
        else:
            raise UnsupportedLayerError(
                f"{_where(node)} has no LayerSpec equivalent (supported functional ops: add, "
                f"relu, relu6, hardswish, pooling, mean over H and W, flatten/view/reshape)"
            )

    # -- per-op builders -------------------------------------------------------------------
    def _input(self, node: fx.Node, x: Any) -> tuple[int, tuple[int, ...], tuple[int, ...] | None]:
        """(source unit, input shape, pending zero padding) of a conv/pool input."""
        if isinstance(x, fx.Node) and x in self.padding:
            pre, pads = self.padding[x]
            shape = _shape(pre)
            assert shape is not None
            return self._src(pre, node), shape, pads
        shape = _shape(x)
        if shape is None:
            raise UnsupportedLayerError(f"{_where(node)}: its input has no known shape")
        return self._src(x, node), shape, None

    def _conv(self, node: fx.Node, m: nn.Conv2d, name: str) -> None:
        where = _where(node)
        src, in_shape, _ = self._input(node, node.args[0])
        out_shape = _shape(node)
        assert out_shape is not None
        if len(in_shape) != 4:
            raise UnsupportedLayerError(f"{where}: Conv2d input must be NCHW, got {in_shape}")
        if m.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{where}: padding_mode={m.padding_mode!r} is not supported; use zeros"
            )
        kernel, stride, dilation = _pair(m.kernel_size), _pair(m.stride), _pair(m.dilation)
        padding = _symmetric_padding(
            (in_shape[2], in_shape[3]),
            (out_shape[2], out_shape[3]),
            kernel,
            stride,
            dilation,
            m.padding if not isinstance(m.padding, str) else None,
            where,
        )
        if in_shape[1] != m.in_channels or out_shape[1] != m.out_channels:
            raise UnsupportedLayerError(
                f"{where}: traced shapes {in_shape} -> {out_shape} disagree with the module's "
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
                f"{where}: computed output {core.output_shape()} differs from traced {out_shape}"
            )
        self._new(
            node,
            _Draft(core=core, modules=[name], nodes=[node.name], source=src, batch_norm_open=True),
        )

    def _linear(self, node: fx.Node, m: nn.Linear, name: str) -> None:
        where = _where(node)
        x = node.args[0]
        shape = _shape(x)
        if shape is None or len(shape) != 2:
            raise UnsupportedLayerError(
                f"{where}: Linear needs a (N, features) input, got {shape}; flatten it first"
            )
        src = self._src(x, node)
        src_channels = shape[1] if src == INPUT_SOURCE else _out_channels(self.drafts[src])
        if shape[1] % src_channels:
            raise UnsupportedLayerError(
                f"{where}: {shape[1]} input features are not a whole multiple of the "
                f"{src_channels} channels that feed it"
            )
        core = LayerSpec.create(
            op=OpKind.LINEAR,
            input_shape=shape,
            out_channels=m.out_features,
            bias=m.bias is not None,
        )
        self._new(
            node,
            _Draft(
                core=core,
                modules=[name],
                nodes=[node.name],
                source=src,
                in_scale=shape[1] // src_channels,
            ),
        )

    def _activation(self, node: fx.Node, act: Activation, x: Any, module: str | None) -> None:
        idx = self._fusable_into(node, x)
        d = self.drafts[idx] if idx is not None else None
        if (
            d is None
            or d.core.op not in (OpKind.CONV2D, OpKind.LINEAR, OpKind.ADD)
            or d.activation is not Activation.NONE
        ):
            raise UnsupportedLayerError(
                f"{_where(node)}: a {act.value} activation must directly follow a conv (+BN, "
                f"+residual add), a linear or an add whose output nothing else reads"
            )
        assert idx is not None
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

    def _add(self, node: fx.Node) -> None:
        a = node.args[0] if node.args else node.kwargs.get("input")
        b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        sa, sb = _shape(a), _shape(b)
        if sa is None or sb is None or sa != sb or node.kwargs.get("alpha", 1) != 1:
            raise UnsupportedLayerError(
                f"{_where(node)}: only adds of two tensors of equal shape are supported "
                f"(got {sa} + {sb})"
            )
        if len(sa) != 4:
            raise UnsupportedLayerError(f"{_where(node)}: add of rank-{len(sa)} tensors")
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
            d.operand = self._src(other, node)
            self._extend(node, idx, None)
            return
        core = LayerSpec.create(op=OpKind.ADD, input_shape=sa)
        self._new(
            node,
            _Draft(
                core=core,
                modules=[],
                nodes=[node.name],
                source=self._src(a, node),
                operand=self._src(b, node),
            ),
        )

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
        where = _where(node)
        src, in_shape, _ = self._input(node, node.args[0])
        out_shape = _shape(node)
        assert out_shape is not None
        if len(in_shape) != 4:
            raise UnsupportedLayerError(f"{where}: pooling input must be NCHW, got {in_shape}")
        padding = _symmetric_padding(
            (in_shape[2], in_shape[3]),
            (out_shape[2], out_shape[3]),
            kernel,
            stride,
            dilation,
            _pair(declared_padding),
            where,
        )
        op = OpKind.MAX_POOL if is_max else OpKind.AVG_POOL
        core = LayerSpec.create(
            op=op,
            input_shape=in_shape,
            kernel=kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        self._new(
            node,
            _Draft(core=core, modules=[module] if module else [], nodes=[node.name], source=src),
        )

    def _adaptive_pool(self, node: fx.Node, is_max: bool, module: str | None) -> None:
        where = _where(node)
        x = node.args[0]
        in_shape, out_shape = _shape(x), _shape(node)
        assert out_shape is not None
        if in_shape is None or len(in_shape) != 4:
            raise UnsupportedLayerError(f"{where}: adaptive pooling needs an NCHW input")
        if out_shape[2:] == (1, 1) and not is_max:
            core = LayerSpec.create(op=OpKind.GLOBAL_AVG_POOL, input_shape=in_shape)
            self._new(
                node,
                _Draft(
                    core=core,
                    modules=[module] if module else [],
                    nodes=[node.name],
                    source=self._src(x, node),
                ),
            )
            return
        h, w = in_shape[2], in_shape[3]
        oh, ow = out_shape[2], out_shape[3]
        if h % oh or w % ow:
            raise UnsupportedLayerError(
                f"{where}: adaptive pooling {h}x{w} -> {oh}x{ow} is not a fixed window"
            )
        k = (h // oh, w // ow)
        self._pool_unit(node, is_max, k, k, 0, (1, 1), module)

    def _mean(self, node: fx.Node) -> None:
        x = node.args[0]
        in_shape = _shape(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if in_shape is None or len(in_shape) != 4 or dims is None:
            raise UnsupportedLayerError(f"{_where(node)}: only a mean over H and W is supported")
        dim_list = [dims] if isinstance(dims, int) else list(dims)  # type: ignore[arg-type]
        if sorted(int(d) % 4 for d in dim_list) != [2, 3]:
            raise UnsupportedLayerError(f"{_where(node)}: only a mean over H and W is supported")
        core = LayerSpec.create(op=OpKind.GLOBAL_AVG_POOL, input_shape=in_shape)
        self._new(node, _Draft(core=core, modules=[], nodes=[node.name], source=self._src(x, node)))

    def _free(self, node: fx.Node, x: Any, transparent: bool) -> None:
        """Reshapes, dropout, identity: the output belongs to the input's unit. Only dropout,
        identity and contiguous are transparent to fusion (ORT drops them); after a reshape
        nothing more fuses into the unit."""
        idx = self._src(x, node)
        self.value[node] = idx
        if transparent and idx != INPUT_SOURCE and isinstance(x, fx.Node):
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
                f"{_where(node)}: zero padding is supported only right before a conv or pool"
            )
        self.value[node] = self._src(x, node)
        self.padding[node] = (x, pads)

    def _functional_pad(self, node: fx.Node) -> None:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
        if mode != "constant" or (value or 0) != 0 or not isinstance(pads, (list, tuple)):
            raise UnsupportedLayerError(f"{_where(node)}: only zero padding is supported")
        self._zero_pad(node, node.args[0], tuple(int(p) for p in pads))  # type: ignore[arg-type]


def _out_channels(d: _Draft) -> int:
    return build_specs(d.core, d.activation, d.residual_add)[-1].output_shape()[1]


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
    gm = _trace(frozen, example)
    units = _Walker(gm).run()
    logger.debug("extracted %d fusion units from %s", len(units), type(model).__name__)
    return units
