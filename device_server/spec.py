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
from dataclasses import dataclass

from device_server.errors import InvalidConfigError

__all__ = [
    "OpKind",
    "Activation",
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


class Activation(enum.Enum):
    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"
    HARDSWISH = "hardswish"


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


@dataclass(frozen=True)
class LayerSpec:
    """One fusion unit as the runtime would execute it.

    `input_shape` is (N, C, H, W), or (N, C) for LINEAR. Spatial parameters are (h, w) pairs.
    `groups == C == out_channels` is a depthwise convolution. `batch_norm`, `activation` and
    `residual` describe what the runtime fuses into a convolution; `residual` adds a second
    tensor of the output's shape (the block's skip input) before the activation.
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

    @classmethod
    def create(
        cls,
        op: OpKind | str,
        input_shape: tuple[int, ...] | list[int],
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
    ) -> LayerSpec:
        """Normalises loose arguments (ints for square sizes, strings for enums) and validates.

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
        spec = cls(
            op=op_kind,
            input_shape=tuple(int(x) for x in input_shape),
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
        )
        spec.validate()
        return spec

    # -- derived shapes -------------------------------------------------------------------
    @property
    def in_channels(self) -> int:
        return self.input_shape[1]

    def output_shape(self) -> tuple[int, ...]:
        """The output tensor shape; assumes `validate()` passed."""
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
        return int(_prod(self.input_shape))

    def param_count(self) -> int:
        """Weights of the unit (conv/linear weights, bias and folded BatchNorm scale/shift)."""
        if self.op is OpKind.CONV2D:
            per_filter = (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
            n = self.out_channels * per_filter
        elif self.op is OpKind.LINEAR:
            n = self.out_channels * self.in_channels
        else:
            return 0
        n += self.out_channels * (int(self.bias) + 2 * int(self.batch_norm))
        return n

    def tensor_bytes(self) -> int:
        """float32 bytes of inputs, weights and output: what a session must hold."""
        inputs = _prod(self.input_shape) * (2 if self.op is OpKind.ADD else 1)
        outputs = _prod(self.output_shape()) * (2 if self.residual else 1)  # + the add operand
        return 4 * (inputs + self.param_count() + outputs)

    # -- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises InvalidConfigError naming the first problem and what to change."""
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
        d = dataclasses.asdict(self)
        d["op"] = self.op.value
        d["activation"] = self.activation.value
        for k in ("input_shape", "kernel", "stride", "padding", "dilation"):
            d[k] = list(d[k])
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
        return f"{self.op.value} {s[1]} @{s[2]}x{s[3]}"


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
