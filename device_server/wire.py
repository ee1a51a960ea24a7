"""Every conversion between the daemon's plain dataclasses (spec.py, stats.py, device_state.py,
cpu_topology.py, the measurer's `Timed`) and the netadapt.v1 protobuf messages, both ways, and
errors as `google.rpc.Status`. The servicer packs and unpacks with these; the host's own
conversions (host/device/wire.py) build on them. Nothing else touches message fields.

Dataclasses are built by keyword from messages, never by position, so a field added to either
side cannot shift another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from google.rpc import code_pb2, status_pb2

from device_server.cpu_topology import CpuCluster
from device_server.device_state import Battery, CoreClock, DeviceState, LoadAverage, ThermalZone
from device_server.errors import InvalidConfigError
from device_server.inputs import InputFeed, dtype_named
from device_server.spec import (
    DEFAULT_PROVIDER,
    Activation,
    AttrValue,
    GraphOptimization,
    LayerSpec,
    MeasurePolicy,
    NodeOperand,
    OpKind,
    SessionSpec,
)
from device_server.stats import Conditions, TimingStats
from protos import device_pb2 as pb

if TYPE_CHECKING:  # both import onnx/onnxruntime, which the host's client must not need
    from device_server.device_info import DeviceIdentity
    from device_server.measurer import Timed

__all__ = [
    "feeds_to_proto",
    "feeds_from_proto",
    "input_shapes_to_proto",
    "input_shapes_from_proto",
    "layer_to_proto",
    "layer_from_proto",
    "session_to_proto",
    "session_from_proto",
    "policy_to_proto",
    "policy_from_proto",
    "timing_to_proto",
    "timing_from_proto",
    "conditions_to_proto",
    "conditions_from_proto",
    "device_state_to_proto",
    "device_state_from_proto",
    "cluster_to_proto",
    "cluster_from_proto",
    "device_info_to_proto",
    "measure_response",
    "failed_response",
    "error_status",
    "status_code_name",
]

_OPS = {
    OpKind.CONV2D: pb.CONV2D,
    OpKind.LINEAR: pb.LINEAR,
    OpKind.MAX_POOL: pb.MAX_POOL,
    OpKind.AVG_POOL: pb.AVG_POOL,
    OpKind.GLOBAL_AVG_POOL: pb.GLOBAL_AVG_POOL,
    OpKind.ADD: pb.ADD,
    OpKind.NODE: pb.NODE,
}
_OPS_BACK = {v: k for k, v in _OPS.items()}
_ACTS = {
    Activation.NONE: pb.ACTIVATION_NONE,
    Activation.RELU: pb.RELU,
    Activation.RELU6: pb.RELU6,
    Activation.HARDSWISH: pb.HARDSWISH,
    Activation.SIGMOID: pb.SIGMOID,
    Activation.HARDSIGMOID: pb.HARDSIGMOID,
    Activation.SILU: pb.SILU,
}
_ACTS_BACK = {v: k for k, v in _ACTS.items()}
_OPT = {
    GraphOptimization.DISABLE_ALL: pb.DISABLE_ALL,
    GraphOptimization.ENABLE_BASIC: pb.ENABLE_BASIC,
    GraphOptimization.ENABLE_EXTENDED: pb.ENABLE_EXTENDED,
    GraphOptimization.ENABLE_ALL: pb.ENABLE_ALL,
}
_OPT_BACK = {v: k for k, v in _OPT.items()}


def layer_to_proto(spec: LayerSpec) -> pb.LayerConfig:
    return pb.LayerConfig(
        op=_OPS[spec.op],
        input_shape=list(spec.input_shape),
        out_channels=spec.out_channels,
        kernel=list(spec.kernel),
        stride=list(spec.stride),
        padding=list(spec.padding),
        dilation=list(spec.dilation),
        groups=spec.groups,
        bias=spec.bias,
        batch_norm=spec.batch_norm,
        activation=_ACTS[spec.activation],
        residual=spec.residual,
        node_op=spec.node_op,
        operands=[_operand_to_proto(o) for o in spec.operands],
        attributes=[_attribute_to_proto(k, v) for k, v in spec.attributes],
        out_shapes=[pb.InputShape(dims=list(o)) for o in spec.out_shapes],
    )


_OPERAND_KINDS = {"input": pb.NodeOperand.INPUT, "weight": pb.NodeOperand.WEIGHT,
                  "const": pb.NodeOperand.CONST}
_OPERAND_KINDS_BACK = {v: k for k, v in _OPERAND_KINDS.items()}


def _operand_to_proto(o: NodeOperand) -> pb.NodeOperand:
    return pb.NodeOperand(kind=_OPERAND_KINDS[o.kind], shape=list(o.shape),
                          values=[float(v) for v in o.values], int64=o.dtype == "int64")


def _operand_from_proto(msg: pb.NodeOperand) -> NodeOperand:
    if msg.kind not in _OPERAND_KINDS_BACK:
        raise InvalidConfigError(f"unknown node operand kind ({msg.kind})")
    dtype = "int64" if msg.int64 else "float"
    cast = int if msg.int64 else float
    return NodeOperand(kind=_OPERAND_KINDS_BACK[msg.kind], shape=tuple(msg.shape),
                       values=tuple(cast(v) for v in msg.values), dtype=dtype)


def _attribute_to_proto(name: str, value: AttrValue) -> pb.NodeAttribute:
    if isinstance(value, str):
        return pb.NodeAttribute(name=name, s=value)
    if isinstance(value, int):
        return pb.NodeAttribute(name=name, i=value)
    if isinstance(value, float):
        return pb.NodeAttribute(name=name, f=value)
    if all(isinstance(v, int) for v in value):
        return pb.NodeAttribute(name=name, ints=pb.IntList(values=[int(v) for v in value]))
    return pb.NodeAttribute(name=name, floats=pb.FloatList(values=list(value)))


def _attribute_from_proto(msg: pb.NodeAttribute) -> tuple[str, AttrValue]:
    which = msg.WhichOneof("value")
    if which is None:
        raise InvalidConfigError(f"node attribute {msg.name!r} has no value")
    if which in ("ints", "floats"):
        return msg.name, tuple(getattr(msg, which).values)
    return msg.name, getattr(msg, which)


def feeds_to_proto(feeds: Mapping[str, InputFeed]) -> dict[str, pb.InputValues]:
    """Per-input feeds as MeasureModelRequest.inputs."""
    out = {}
    for name, feed in feeds.items():
        if feed.values is not None:
            values = np.ascontiguousarray(feed.values)
            little = values.astype(values.dtype.newbyteorder("<"), copy=False)
            out[name] = pb.InputValues(tensor=pb.TensorValues(
                dims=list(values.shape), dtype=values.dtype.name, data=little.tobytes()))
        else:
            out[name] = pb.InputValues(range=pb.ValueRange(low=feed.low, high=feed.high,
                                                           integer=feed.integer))
    return out


def feeds_from_proto(inputs: Mapping[str, pb.InputValues]) -> dict[str, InputFeed]:
    """Raises InvalidConfigError for values that do not fill their shape, an unknown dtype or
    an empty range."""
    out = {}
    for name, msg in inputs.items():
        which = msg.WhichOneof("source")
        if which == "tensor":
            t = msg.tensor
            dtype = np.dtype(dtype_named(t.dtype)).newbyteorder("<")
            count = int(np.prod(t.dims)) if t.dims else 1
            if len(t.data) != count * dtype.itemsize:
                raise InvalidConfigError(
                    f"input {name!r}: {len(t.data)} bytes do not hold {count} {t.dtype} values "
                    f"of shape {list(t.dims)}")
            values = np.frombuffer(t.data, dtype=dtype).reshape(tuple(t.dims))
            out[name] = InputFeed(values=values.astype(dtype.newbyteorder("=")))
        elif which == "range":
            out[name] = InputFeed.range(msg.range.low, msg.range.high, msg.range.integer)
        else:
            raise InvalidConfigError(f"input {name!r}: give values or a range")
    return out


def input_shapes_to_proto(shapes: Mapping[str, Sequence[int]]) -> dict[str, pb.InputShape]:
    """Shapes of inputs with symbolic dims, as MeasureModelRequest.input_shapes."""
    return {name: pb.InputShape(dims=[int(d) for d in dims]) for name, dims in shapes.items()}


def input_shapes_from_proto(shapes: Mapping[str, pb.InputShape]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(s.dims) for name, s in shapes.items()}


def layer_from_proto(msg: pb.LayerConfig) -> LayerSpec:
    """Raises InvalidConfigError for an unknown op or activation, or an unbuildable unit."""
    if msg.op not in _OPS_BACK:
        known = ", ".join(pb.OpKind.Name(v) for v in _OPS_BACK)
        raise InvalidConfigError(f"unknown or unset op kind ({msg.op}); use one of: {known}")
    if msg.activation not in _ACTS_BACK:
        raise InvalidConfigError(f"unknown activation ({msg.activation})")
    return LayerSpec.create(
        op=_OPS_BACK[msg.op],
        input_shape=tuple(msg.input_shape),
        out_channels=msg.out_channels,
        kernel=tuple(msg.kernel),
        stride=tuple(msg.stride),
        padding=tuple(msg.padding),
        dilation=tuple(msg.dilation),
        groups=msg.groups,
        bias=msg.bias,
        batch_norm=msg.batch_norm,
        activation=_ACTS_BACK[msg.activation],
        residual=msg.residual,
        node_op=msg.node_op,
        operands=[_operand_from_proto(o) for o in msg.operands],
        attributes=[_attribute_from_proto(a) for a in msg.attributes],
        out_shapes=[tuple(o.dims) for o in msg.out_shapes],
    )


def session_to_proto(spec: SessionSpec) -> pb.SessionOptions:
    return pb.SessionOptions(
        provider=spec.provider,
        provider_options=dict(spec.provider_options),
        intra_op_threads=spec.intra_op_threads,
        graph_optimization=_OPT[spec.graph_optimization],
    )


def session_from_proto(msg: pb.SessionOptions) -> SessionSpec:
    if msg.intra_op_threads < 0:
        raise InvalidConfigError(
            f"intra_op_threads must be >= 0 (0 = daemon default), got {msg.intra_op_threads}"
        )
    level = msg.graph_optimization
    if level != pb.GRAPH_OPTIMIZATION_DEFAULT and level not in _OPT_BACK:
        raise InvalidConfigError(f"unknown graph optimisation level ({level})")
    return SessionSpec(
        provider=msg.provider or DEFAULT_PROVIDER,
        provider_options=tuple(sorted(msg.provider_options.items())),
        intra_op_threads=msg.intra_op_threads,
        graph_optimization=_OPT_BACK.get(level, GraphOptimization.ENABLE_ALL),
    )


def policy_to_proto(policy: MeasurePolicy) -> pb.MeasurePolicy:
    return pb.MeasurePolicy(
        warmup_runs=policy.warmup_runs,
        min_warmup_ms=policy.min_warmup_ms,
        repeat=policy.repeat,
        number=policy.number,
        min_repeat_ms=policy.min_repeat_ms,
    )


def policy_from_proto(msg: pb.MeasurePolicy) -> MeasurePolicy:
    """Zero fields take the defaults; negative ones are refused."""
    default = MeasurePolicy()
    policy = MeasurePolicy(
        warmup_runs=msg.warmup_runs or default.warmup_runs,
        min_warmup_ms=msg.min_warmup_ms or default.min_warmup_ms,
        repeat=msg.repeat or default.repeat,
        number=msg.number,
        min_repeat_ms=msg.min_repeat_ms or default.min_repeat_ms,
    )
    policy.validate()
    return policy


def timing_to_proto(t: TimingStats) -> pb.TimingStats:
    return pb.TimingStats(
        median_ms=t.median_ms,
        mean_ms=t.mean_ms,
        std_ms=t.std_ms,
        p90_ms=t.p90_ms,
        min_ms=t.min_ms,
        max_ms=t.max_ms,
        samples_count=t.samples_count,
        samples_ms=list(t.samples_ms),
        number=t.number,
        warmup_runs=t.warmup_runs,
        session_create_ms=t.session_create_ms,
        value_ms=t.value_ms,
        ci_low_ms=t.ci_low_ms,
        ci_high_ms=t.ci_high_ms,
        preempted_samples=t.preempted_samples,
        other_load=t.other_load,
        steal=t.steal,
    )


def timing_from_proto(msg: pb.TimingStats) -> TimingStats:
    return TimingStats(
        median_ms=msg.median_ms,
        mean_ms=msg.mean_ms,
        std_ms=msg.std_ms,
        p90_ms=msg.p90_ms,
        min_ms=msg.min_ms,
        max_ms=msg.max_ms,
        samples_count=msg.samples_count,
        samples_ms=tuple(msg.samples_ms),
        number=msg.number,
        warmup_runs=msg.warmup_runs,
        session_create_ms=msg.session_create_ms,
        value_ms=msg.value_ms,
        ci_low_ms=msg.ci_low_ms,
        ci_high_ms=msg.ci_high_ms,
        preempted_samples=msg.preempted_samples,
        other_load=msg.other_load,
        steal=msg.steal,
    )


def conditions_to_proto(c: Conditions) -> pb.Conditions:
    return pb.Conditions(
        device_fingerprint=c.device_fingerprint,
        ort_version=c.ort_version,
        provider=c.provider,
        provider_options=dict(c.provider_options),
        intra_op_threads=c.intra_op_threads,
        graph_optimization=_OPT[GraphOptimization(c.graph_optimization)],
        pinned_cpus=list(c.pinned_cpus),
    )


def conditions_from_proto(msg: pb.Conditions) -> Conditions:
    level = _OPT_BACK.get(msg.graph_optimization, GraphOptimization.ENABLE_ALL)
    return Conditions(
        device_fingerprint=msg.device_fingerprint,
        ort_version=msg.ort_version,
        provider=msg.provider,
        intra_op_threads=msg.intra_op_threads,
        graph_optimization=level.value,
        provider_options=tuple(sorted(msg.provider_options.items())),
        pinned_cpus=tuple(msg.pinned_cpus),
    )


# -- device state, identity --------------------------------------------------------------------
def device_state_to_proto(state: DeviceState) -> pb.DeviceState:
    msg = pb.DeviceState(
        clocks=[pb.CoreClock(cpu=c.cpu, mhz=c.mhz) for c in state.clocks],
        thermal_zones=[pb.ThermalZone(type=z.type, temp_c=z.temp_c)
                       for z in state.thermal_zones],
        batteries=[pb.Battery(name=b.name, percent=b.percent, status=b.status, temp_c=b.temp_c)
                   for b in state.batteries],
    )
    if state.load is not None:
        msg.load.CopyFrom(pb.LoadAverage(one_min=state.load.one_min,
                                         five_min=state.load.five_min,
                                         fifteen_min=state.load.fifteen_min))
    return msg


def device_state_from_proto(msg: pb.DeviceState) -> DeviceState:
    return DeviceState(
        load=LoadAverage(one_min=msg.load.one_min, five_min=msg.load.five_min,
                         fifteen_min=msg.load.fifteen_min) if msg.HasField("load") else None,
        clocks=tuple(CoreClock(cpu=c.cpu, mhz=c.mhz) for c in msg.clocks),
        thermal_zones=tuple(ThermalZone(type=z.type, temp_c=z.temp_c)
                            for z in msg.thermal_zones),
        batteries=tuple(
            Battery(name=b.name,
                    percent=b.percent if b.HasField("percent") else None,
                    status=b.status,
                    temp_c=b.temp_c if b.HasField("temp_c") else None)
            for b in msg.batteries),
    )


def cluster_to_proto(c: CpuCluster) -> pb.CpuCluster:
    return pb.CpuCluster(core=c.core, ident=c.ident, cpus=list(c.cpus),
                         max_freq_khz=c.max_freq_khz)


def cluster_from_proto(msg: pb.CpuCluster) -> CpuCluster:
    return CpuCluster(core=msg.core, ident=msg.ident, cpus=tuple(msg.cpus),
                      max_freq_khz=msg.max_freq_khz)


def device_info_to_proto(identity: DeviceIdentity, *, queue_depth: int, max_queue_depth: int,
                         default_threads: int, state: DeviceState) -> pb.DeviceInfo:
    """GetDeviceInfo's reply: who the device is, its queue now and its state as read."""
    return pb.DeviceInfo(
        fingerprint=identity.fingerprint,
        cpu_model=identity.cpu_model,
        cpu_count=identity.cpu_count,
        machine=identity.machine,
        os=identity.os,
        os_release=identity.os_release,
        android_version=identity.android_version,
        ort_version=identity.ort_version,
        providers=list(identity.providers),
        daemon_version=identity.daemon_version,
        python_version=identity.python_version,
        queue_depth=queue_depth,
        max_queue_depth=max_queue_depth,
        default_threads=default_threads,
        clusters=[cluster_to_proto(c) for c in identity.clusters],
        pinned_cpus=list(identity.pinned_cpus),
        board_model=identity.board_model,
        soc=identity.soc,
        product_model=identity.product_model,
        build_fingerprint=identity.build_fingerprint,
        device_state=device_state_to_proto(state),
    )


# -- replies and errors ------------------------------------------------------------------------
def measure_response(request_id: str, timed: Timed) -> pb.MeasureResponse:
    """A measurement's reply (Measure, MeasureStream, MeasureOverhead, MeasureModel)."""
    return pb.MeasureResponse(
        request_id=request_id,
        config_hash=timed.config_hash,
        timing=timing_to_proto(timed.timing),
        conditions=conditions_to_proto(timed.conditions),
        started_unix_ns=timed.started_unix_ns,
        finished_unix_ns=timed.finished_unix_ns,
        device_state=device_state_to_proto(timed.state),
    )


def failed_response(request_id: str, code: str, message: str) -> pb.MeasureResponse:
    """A MeasureStream item that could not be measured: its status in-band."""
    return pb.MeasureResponse(request_id=request_id, status=error_status(code, message))


def error_status(code: str, message: str) -> status_pb2.Status:
    """`code`: a gRPC status code name, e.g. "INVALID_ARGUMENT" (unknown names: UNKNOWN)."""
    try:
        number = code_pb2.Code.Value(code)
    except ValueError:
        number = code_pb2.UNKNOWN
    return status_pb2.Status(code=number, message=message)


def status_code_name(status: status_pb2.Status) -> str:
    """The gRPC status code name of `status`, e.g. "INVALID_ARGUMENT"."""
    try:
        return code_pb2.Code.Name(status.code)
    except ValueError:
        return "UNKNOWN"
