"""What can be measured: a fusion unit (`LayerSpec`), the session it runs in (`SessionSpec`) and
the timing policy (`MeasurePolicy`), as plain dataclasses with validation.

This module is the one definition of a layer configuration. The daemon validates with it, the
host builds requests with it, and the lookup tables key their rows by `LayerSpec.key()`.
It knows nothing of gRPC, ONNX or torch.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from device_server.errors import InvalidConfigError
from device_server.stats import Conditions

__all__ = [
    "OpKind",
    "Activation",
    "NodeOperand",
    "AttrValue",
    "GraphOptimization",
    "LayerSpec",
    "SessionSpec",
    "MeasurePolicy",
    "DEFAULT_PROVIDER",
]

DEFAULT_PROVIDER = "CPUExecutionProvider"


class OpKind(enum.Enum):
    CONV2D = "conv2d"
    LINEAR = "linear"
    MAX_POOL = "max_pool"
    AVG_POOL = "avg_pool"
    GLOBAL_AVG_POOL = "global_avg_pool"
    ADD = "add"
    NODE = "node"  # any one ONNX node with its real shapes (see `LayerSpec.node`)


class Activation(enum.Enum):
    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"
    HARDSWISH = "hardswish"
    SIGMOID = "sigmoid"
    HARDSIGMOID = "hardsigmoid"  # torch's: relu6(x + 3) / 6 (ONNX HardSigmoid alpha 1/6)
    SILU = "silu"  # x * sigmoid(x), exported as Sigmoid + Mul


class GraphOptimization(enum.Enum):
    DISABLE_ALL = "disable_all"
    ENABLE_BASIC = "enable_basic"
    ENABLE_EXTENDED = "enable_extended"
    ENABLE_ALL = "enable_all"


def _pair(values: tuple[int, ...], default: int, name: str) -> tuple[int, int]:
    if len(values) == 0:
        return (default, default)
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise InvalidConfigError(f"{name} takes one or two values, got {list(values)}")


AttrValue = int | float | str | tuple[int, ...] | tuple[float, ...]
"""An ONNX node attribute: a number, a string, or a list of ints or of floats."""

_OPERAND_KINDS = ("input", "weight", "const")
_OPERAND_DTYPES = ("float", "int64")
_NODE_OP = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_ATTR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NODE_FIELDS = ("node_op", "operands", "attributes", "out_shapes")


@dataclass(frozen=True, kw_only=True)
class NodeOperand:
    """One input of a NODE unit, in the ONNX node's input order.

    `kind` "input": a graph input, fed random values when timed; "weight": a float initializer
    of random values (e.g. BatchNormalization's scale and mean); "const": an initializer holding
    `values` (row-major, e.g. a Split's sizes or a Clip's bounds) of `dtype` "int64" or "float".
    An empty `shape` is a scalar.
    """

    kind: str
    shape: tuple[int, ...]
    values: tuple[int | float, ...] = ()
    dtype: str = "float"

    @classmethod
    def input(cls, shape: Sequence[int]) -> NodeOperand:
        return cls(kind="input", shape=tuple(int(d) for d in shape))

    @classmethod
    def weight(cls, shape: Sequence[int]) -> NodeOperand:
        return cls(kind="weight", shape=tuple(int(d) for d in shape))

    @classmethod
    def const(cls, values: Sequence[float], shape: Sequence[int] | None = None,
              dtype: str = "int64") -> NodeOperand:
        """A constant; `shape` defaults to a 1-D tensor of `values`."""
        cast: Any = int if dtype == "int64" else float
        vals = tuple(cast(v) for v in values)
        dims = (len(vals),) if shape is None else tuple(int(d) for d in shape)
        return cls(kind="const", shape=dims, values=vals, dtype=dtype)

    @classmethod
    def coerce(cls, value: NodeOperand | Mapping[str, Any]) -> NodeOperand:
        """From itself or its `to_dict()` form."""
        if isinstance(value, NodeOperand):
            return value
        dtype = str(value.get("dtype", "float"))
        cast: Any = int if dtype == "int64" else float
        return cls(kind=str(value["kind"]), shape=tuple(int(d) for d in value["shape"]),
                   values=tuple(cast(v) for v in value.get("values", ())), dtype=dtype)

    def validate(self, index: int) -> None:
        """Raises InvalidConfigError naming operand `index` and what is wrong."""
        where = f"operand {index}"
        if self.kind not in _OPERAND_KINDS:
            raise InvalidConfigError(
                f"{where}: kind {self.kind!r} is not one of {', '.join(_OPERAND_KINDS)}")
        if self.dtype not in _OPERAND_DTYPES:
            raise InvalidConfigError(
                f"{where}: dtype {self.dtype!r} is not one of {', '.join(_OPERAND_DTYPES)}")
        if any(d <= 0 for d in self.shape):
            raise InvalidConfigError(f"{where}: dimensions must be positive, got "
                                     f"{list(self.shape)}")
        if self.kind == "const":
            if len(self.values) != _prod(self.shape):
                raise InvalidConfigError(
                    f"{where}: a constant of shape {list(self.shape)} needs "
                    f"{_prod(self.shape)} values, got {len(self.values)}")
        elif self.values or self.dtype != "float":
            raise InvalidConfigError(f"{where}: only constants carry values or an int64 dtype")

    def nbytes(self) -> int:
        return _prod(self.shape) * (8 if self.dtype == "int64" else 4)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "shape": list(self.shape), "values": list(self.values),
                "dtype": self.dtype}


def _attr_value(name: str, value: Any) -> AttrValue:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        items = tuple(value)
        if all(isinstance(v, (int, bool)) for v in items):
            return tuple(int(v) for v in items)
        if all(isinstance(v, (int, float)) for v in items):
            return tuple(float(v) for v in items)
    raise InvalidConfigError(
        f"attribute {name!r}: {value!r} is not a number, a string or a list of numbers")


def _attributes(value: Mapping[str, Any] | Iterable[Sequence[Any]]) -> tuple[
        tuple[str, AttrValue], ...]:
    pairs = value.items() if isinstance(value, Mapping) else (tuple(p) for p in value)
    out = {}
    for name, v in pairs:
        if not isinstance(name, str) or not _ATTR_NAME.match(name):
            raise InvalidConfigError(f"attribute name {name!r} is not an identifier")
        out[name] = _attr_value(name, v)
    return tuple(sorted(out.items()))


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One fusion unit as the runtime would execute it.

    `input_shape` is (N, C, H, W), or (N, C) for LINEAR. Spatial parameters are (h, w) pairs.
    `groups == C == out_channels` is a depthwise convolution. `batch_norm`, `activation` and
    `residual` describe what the runtime fuses into a convolution; `residual` adds a second
    tensor of the output's shape (the block's skip input) before the activation.

    NODE is any single ONNX node that the fixed kinds do not describe (a channel-wise Mul, a
    Concat, a Split, a standalone BatchNormalization or Sigmoid, ...): `node_op` is its ONNX op
    type, `operands` its inputs with their real shapes, `attributes` its ONNX attributes and
    `out_shapes` its outputs' shapes; `input_shape` is the first operand's shape. Build one with
    `LayerSpec.node`. Its key is its op type, attributes and shapes, like any other unit.
    """

    op: OpKind
    input_shape: tuple[int, ...]
    out_channels: int = 0
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    batch_norm: bool = False
    activation: Activation = Activation.NONE
    residual: bool = False
    node_op: str = ""  # NODE only: the ONNX op type
    operands: tuple[NodeOperand, ...] = ()  # NODE only: the node's inputs, in order
    attributes: tuple[tuple[str, AttrValue], ...] = ()  # NODE only: sorted by name
    out_shapes: tuple[tuple[int, ...], ...] = ()  # NODE only: every output's shape

    @classmethod
    def node(
        cls,
        op_type: str,
        operands: Sequence[NodeOperand | Mapping[str, Any]],
        out_shapes: Sequence[Sequence[int]],
        attributes: Mapping[str, Any] | Iterable[Sequence[Any]] = (),
    ) -> LayerSpec:
        """A NODE unit: one ONNX node of type `op_type` (e.g. "Mul") with these operands.

        Raises:
            InvalidConfigError: the node is malformed; the message says what to change.
        """
        return cls.create(OpKind.NODE, (), node_op=op_type, operands=operands,
                          out_shapes=out_shapes, attributes=attributes)

    @classmethod
    def create(
        cls,
        op: OpKind | str,
        input_shape: tuple[int, ...] | list[int],
        *,
        out_channels: int = 0,
        kernel: int | tuple[int, ...] = (),
        stride: int | tuple[int, ...] = (),
        padding: int | tuple[int, ...] = (),
        dilation: int | tuple[int, ...] = (),
        groups: int = 1,
        bias: bool = False,
        batch_norm: bool = False,
        activation: Activation | str = Activation.NONE,
        residual: bool = False,
        node_op: str = "",
        operands: Sequence[NodeOperand | Mapping[str, Any]] = (),
        attributes: Mapping[str, Any] | Iterable[Sequence[Any]] = (),
        out_shapes: Sequence[Sequence[int]] = (),
    ) -> LayerSpec:
        """Normalises loose arguments (ints for square sizes, strings for enums) and validates.
        Everything after the op and its input shape is named, so a field added later cannot
        shift another.

        Raises:
            InvalidConfigError: the unit cannot be built; the message says what to change.
        """
        try:
            op_kind = OpKind(op) if isinstance(op, str) else op
        except ValueError:
            known = ", ".join(k.value for k in OpKind)
            raise InvalidConfigError(f"unknown op kind {op!r}; use one of: {known}") from None
        try:
            act = Activation(activation) if isinstance(activation, str) else activation
        except ValueError:
            known = ", ".join(a.value for a in Activation)
            raise InvalidConfigError(
                f"unknown activation {activation!r}; use one of: {known}"
            ) from None

        def tup(v: int | tuple[int, ...]) -> tuple[int, ...]:
            return (v,) if isinstance(v, int) else tuple(int(x) for x in v)

        default_kernel = 1
        node_operands = tuple(NodeOperand.coerce(o) for o in operands)
        shape = tuple(int(x) for x in input_shape)
        if op_kind is OpKind.NODE and not shape and node_operands:
            shape = node_operands[0].shape
        spec = cls(
            op=op_kind,
            input_shape=shape,
            out_channels=int(out_channels),
            kernel=_pair(tup(kernel), default_kernel, "kernel"),
            stride=_pair(tup(stride), 1, "stride"),
            padding=_pair(tup(padding), 0, "padding"),
            dilation=_pair(tup(dilation), 1, "dilation"),
            groups=int(groups) if groups else 1,
            bias=bool(bias),
            batch_norm=bool(batch_norm),
            activation=act,
            residual=bool(residual),
            node_op=str(node_op),
            operands=node_operands,
            attributes=_attributes(attributes),
            out_shapes=tuple(tuple(int(d) for d in o) for o in out_shapes),
        )
        spec.validate()
        return spec

    # -- derived shapes -------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.input_shape[1]

    def output_shape(self) -> tuple[int, ...]:
        """The output tensor shape; assumes `validate()` passed."""
        if self.op is OpKind.NODE:
            return self.out_shapes[0]
        n, c = self.input_shape[0], self.input_shape[1]
        if self.op is OpKind.LINEAR:
            return (n, self.out_channels)
        if self.op is OpKind.ADD:
            return self.input_shape
        if self.op is OpKind.GLOBAL_AVG_POOL:
            return (n, c, 1, 1)
        h, w = self.input_shape[2], self.input_shape[3]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel[0] - 1) - 1)
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel[1] - 1) - 1)
        oh = oh // self.stride[0] + 1
        ow = ow // self.stride[1] + 1
        out_c = self.out_channels if self.op is OpKind.CONV2D else c
        return (n, out_c, oh, ow)

    def macs(self) -> int:
        """Multiply-accumulates of the main op (what an indirect metric would count)."""
        out = self.output_shape()
        if self.op is OpKind.CONV2D:
            per_out = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
            return int(_prod(out) * per_out)
        if self.op is OpKind.LINEAR:
            return int(self.input_shape[0] * self.in_channels * self.out_channels)
        if self.op in (OpKind.MAX_POOL, OpKind.AVG_POOL):
            return int(_prod(out) * self.kernel[0] * self.kernel[1])
        if self.op is OpKind.NODE:  # elementwise-like: one operation per output element
            return int(sum(_prod(o) for o in self.out_shapes))
        return int(_prod(self.input_shape))

    def param_count(self) -> int:
        """Weights of the unit (conv/linear weights, bias and folded BatchNorm scale/shift)."""
        if self.op is OpKind.CONV2D:
            per_filter = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
            n = self.out_channels * per_filter
        elif self.op is OpKind.LINEAR:
            n = self.out_channels * self.in_channels
        elif self.op is OpKind.NODE:
            return sum(_prod(o.shape) for o in self.operands if o.kind == "weight")
        else:
            return 0
        n += self.out_channels * (int(self.bias) + 2 * int(self.batch_norm))
        return n

    def tensor_bytes(self) -> int:
        """float32 bytes of inputs, weights and output: what a session must hold."""
        if self.op is OpKind.NODE:
            return sum(o.nbytes() for o in self.operands) + 4 * sum(
                _prod(o) for o in self.out_shapes)
        inputs = _prod(self.input_shape) * (2 if self.op is OpKind.ADD else 1)
        outputs = _prod(self.output_shape()) * (2 if self.residual else 1)  # + the add operand
        return 4 * (inputs + self.param_count() + outputs)

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises InvalidConfigError naming the first problem and what to change."""
        if self.op is OpKind.NODE:
            self._validate_node()
            return
        if any(getattr(self, f) for f in _NODE_FIELDS):
            raise InvalidConfigError(
                f"node_op, operands, attributes and out_shapes apply to node units only, not "
                f"{self.op.value}")
        shape = self.input_shape
        want_rank = 2 if self.op is OpKind.LINEAR else 4
        if len(shape) != want_rank:
            layout = "(N, C)" if want_rank == 2 else "(N, C, H, W)"
            raise InvalidConfigError(
                f"{self.op.value} needs input_shape {layout}, got {list(shape)}"
            )
        if any(d <= 0 for d in shape):
            raise InvalidConfigError(f"input_shape dimensions must be positive, got {list(shape)}")
        if self.op in (OpKind.CONV2D, OpKind.LINEAR) and self.out_channels <= 0:
            raise InvalidConfigError(
                f"{self.op.value} needs out_channels > 0, got {self.out_channels}"
            )
        if self.residual and self.op is not OpKind.CONV2D:
            raise InvalidConfigError("residual applies to conv2d only")
        if self.batch_norm and self.op is not OpKind.CONV2D:
            raise InvalidConfigError("batch_norm applies to conv2d only")
        if self.op in (OpKind.CONV2D, OpKind.MAX_POOL, OpKind.AVG_POOL):
            self._validate_window()
        if self.op is OpKind.CONV2D:
            if self.groups <= 0:
                raise InvalidConfigError(f"groups must be positive, got {self.groups}")
            if self.in_channels % self.groups or self.out_channels % self.groups:
                raise InvalidConfigError(
                    f"in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                    f"must both be divisible by groups ({self.groups})"
                )
        elif self.groups != 1:
            raise InvalidConfigError(f"groups applies to conv2d only, got {self.groups}")

    def _validate_node(self) -> None:
        if not _NODE_OP.match(self.node_op):
            raise InvalidConfigError(
                f"node_op must be an ONNX op type such as 'Mul' or 'Concat', got "
                f"{self.node_op!r}")
        if not self.operands or self.operands[0].kind != "input":
            raise InvalidConfigError(
                f"{self.node_op}: the first operand must be an input tensor")
        for i, operand in enumerate(self.operands):
            operand.validate(i)
        if self.input_shape != self.operands[0].shape:
            raise InvalidConfigError(
                f"{self.node_op}: input_shape {list(self.input_shape)} differs from the first "
                f"operand's {list(self.operands[0].shape)}")
        if not self.out_shapes or any(not o or min(o) <= 0 for o in self.out_shapes):
            raise InvalidConfigError(
                f"{self.node_op}: out_shapes must list every output's positive dimensions, "
                f"got {[list(o) for o in self.out_shapes]}")
        default = LayerSpec(op=OpKind.NODE, input_shape=self.input_shape)
        fixed = ("out_channels", "kernel", "stride", "padding", "dilation", "groups", "bias",
                 "batch_norm", "activation", "residual")
        extra = [f for f in fixed if getattr(self, f) != getattr(default, f)]
        if extra:
            raise InvalidConfigError(
                f"{self.node_op}: node units take no {', '.join(extra)}: describe the op by its "
                f"operands and attributes")

    def _validate_window(self) -> None:
        for name, pair, minimum in (
            ("kernel", self.kernel, 1),
            ("stride", self.stride, 1),
            ("dilation", self.dilation, 1),
            ("padding", self.padding, 0),
        ):
            if min(pair) < minimum:
                raise InvalidConfigError(f"{name} must be >= {minimum}, got {list(pair)}")
        for axis, name in ((0, "height"), (1, "width")):
            padded = self.input_shape[2 + axis] + 2 * self.padding[axis]
            extent = self.dilation[axis] * (self.kernel[axis] - 1) + 1
            if extent > padded:
                raise InvalidConfigError(
                    f"kernel {name} {self.kernel[axis]} (dilated extent {extent}) is larger than "
                    f"the padded input {name} {padded}: use a smaller kernel or more padding"
                )
        if self.op is not OpKind.CONV2D and max(self.padding) * 2 > max(self.kernel):
            raise InvalidConfigError(
                f"pool padding {list(self.padding)} must be at most half the kernel "
                f"{list(self.kernel)}"
            )

    # -- identity --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able fields. The node fields appear for NODE units only, so the keys of
        the fixed kinds are what they were before NODE existed."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in _NODE_FIELDS}
        d["op"] = self.op.value
        d["activation"] = self.activation.value
        for k in ("input_shape", "kernel", "stride", "padding", "dilation"):
            d[k] = list(d[k])  # type: ignore[call-overload]
        if self.op is OpKind.NODE:
            d["node_op"] = self.node_op
            d["operands"] = [o.to_dict() for o in self.operands]
            d["attributes"] = [[k, list(v) if isinstance(v, tuple) else v]
                               for k, v in self.attributes]
            d["out_shapes"] = [list(o) for o in self.out_shapes]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> LayerSpec:
        return cls.create(**d)  # type: ignore[arg-type]

    def key(self) -> str:
        """Canonical string identity: equal specs give equal keys, and keys sort stably."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:16]

    def describe(self) -> str:
        """Short human-readable form for tables and messages."""
        s = self.input_shape
        if self.op is OpKind.CONV2D:
            kind = "dwconv" if self.groups == self.in_channels == self.out_channels else "conv"
            extra = "".join(
                [
                    "+bn" if self.batch_norm else "",
                    f"+{self.activation.value}" if self.activation is not Activation.NONE else "",
                    "+res" if self.residual else "",
                ]
            )
            return (
                f"{kind}{self.kernel[0]}x{self.kernel[1]}/s{self.stride[0]} "
                f"{s[1]}->{self.out_channels} @{s[2]}x{s[3]}{extra}"
            )
        if self.op is OpKind.LINEAR:
            return f"linear {s[1]}->{self.out_channels}"
        if self.op is OpKind.ADD:
            return f"add {s[1]} @{s[2]}x{s[3]}"
        if self.op is OpKind.NODE:
            shapes = ", ".join("x".join(str(d) for d in o.shape) or "scalar"
                               for o in self.operands if o.kind == "input")
            return f"{self.node_op} {shapes}"
        return f"{self.op.value} {s[1]} @{s[2]}x{s[3]}"


@dataclass(frozen=True, kw_only=True)
class SessionSpec:
    """How the runtime session is set up: part of the conditions a timing belongs to."""

    provider: str = DEFAULT_PROVIDER
    provider_options: tuple[tuple[str, str], ...] = ()
    intra_op_threads: int = 0  # 0: the daemon's default
    graph_optimization: GraphOptimization = GraphOptimization.ENABLE_ALL

    def with_threads(self, default_threads: int) -> SessionSpec:
        if self.intra_op_threads > 0:
            return self
        return dataclasses.replace(self, intra_op_threads=default_threads)

    def conditions(self, *, fingerprint: str, ort_version: str,
                   pinned_cpus: tuple[int, ...] = ()) -> Conditions:
        """What a timing under this session (threads resolved) on that device is valid for. The
        daemon's replies and the host's table identities both come from here, so they agree."""
        return Conditions(
            device_fingerprint=fingerprint,
            ort_version=ort_version,
            provider=self.provider,
            intra_op_threads=self.intra_op_threads,
            graph_optimization=self.graph_optimization.value,
            provider_options=self.provider_options,
            pinned_cpus=pinned_cpus,
        )

    def key(self) -> str:
        return json.dumps(
            {
                "provider": self.provider,
                "provider_options": dict(self.provider_options),
                "intra_op_threads": self.intra_op_threads,
                "graph_optimization": self.graph_optimization.value,
            },
            sort_keys=True,
            separators=(",", ":"),
        )


@dataclass(frozen=True, kw_only=True)
class MeasurePolicy:
    """Warm-up and repeat policy, as TVM's number/repeat/min_repeat_ms.

    Warm-up runs at least `warmup_runs` calls and at least `min_warmup_ms`. Then `repeat`
    samples are taken, each timing `number` back-to-back calls (auto when 0: enough calls that
    one sample lasts at least `min_repeat_ms`, well above the timer's resolution).
    """

    warmup_runs: int = 10
    min_warmup_ms: float = 100.0
    repeat: int = 20
    number: int = 0
    min_repeat_ms: float = 5.0

    def validate(self) -> None:
        if self.warmup_runs < 0 or self.min_warmup_ms < 0:
            raise InvalidConfigError("warm-up runs and time must be >= 0")
        if self.repeat < 1:
            raise InvalidConfigError(f"repeat must be >= 1, got {self.repeat}")
        if self.number < 0:
            raise InvalidConfigError(f"number must be >= 0 (0 = auto), got {self.number}")
        if self.min_repeat_ms < 0:
            raise InvalidConfigError("min_repeat_ms must be >= 0")


def _prod(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out
