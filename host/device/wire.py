"""Every conversion the host makes between its dataclasses and the netadapt.v1 messages: the
requests it sends (from `LayerSpec`, `SessionSpec`, `MeasurePolicy`, input feeds) and the
replies it reads (`DeviceInfo`, `Measurement`, `MeasureFailure`). The messages both sides share
are converted by the daemon's own module (device_server/wire.py), so there is one definition
of each; `DeviceClient` calls these and touches no message field itself.

Dataclasses are built by keyword, never by position. Imports neither torch nor onnx.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from device_server import wire as shared
from device_server.inputs import InputFeed
from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from host.device.results import DeviceInfo, MeasureFailure, Measurement, MeasureResult
from protos import device_pb2 as pb

__all__ = [
    "measure_request",
    "overhead_request",
    "model_request",
    "device_info_from_proto",
    "measurement_from_proto",
    "result_from_proto",
]


def measure_request(request_id: str, layer: pb.LayerConfig, session: pb.SessionOptions,
                    policy: pb.MeasurePolicy) -> pb.MeasureRequest:
    """A Measure / MeasureStream request from parts converted once (`shared.layer_to_proto`,
    `session_to_proto`, `policy_to_proto`): a stream sends many with one session and policy."""
    return pb.MeasureRequest(request_id=request_id, layer=layer, session=session, policy=policy)


def overhead_request(session: SessionSpec, policy: MeasurePolicy) -> pb.MeasureOverheadRequest:
    return pb.MeasureOverheadRequest(session=shared.session_to_proto(session),
                                     policy=shared.policy_to_proto(policy))


def model_request(request_id: str, sha256: str, session: SessionSpec, policy: MeasurePolicy,
                  input_shapes: Mapping[str, Sequence[int]],
                  input_feeds: Mapping[str, InputFeed]) -> pb.MeasureModelRequest:
    return pb.MeasureModelRequest(
        request_id=request_id,
        sha256=sha256,
        session=shared.session_to_proto(session),
        policy=shared.policy_to_proto(policy),
        input_shapes=shared.input_shapes_to_proto(input_shapes),
        inputs=shared.feeds_to_proto(input_feeds),
    )


def device_info_from_proto(msg: pb.DeviceInfo) -> DeviceInfo:
    return DeviceInfo(
        fingerprint=msg.fingerprint,
        cpu_model=msg.cpu_model,
        cpu_count=msg.cpu_count,
        machine=msg.machine,
        os=msg.os,
        os_release=msg.os_release,
        android_version=msg.android_version,
        ort_version=msg.ort_version,
        providers=tuple(msg.providers),
        daemon_version=msg.daemon_version,
        python_version=msg.python_version,
        queue_depth=msg.queue_depth,
        max_queue_depth=msg.max_queue_depth,
        default_threads=msg.default_threads,
        state=shared.device_state_from_proto(msg.device_state),
        clusters=tuple(shared.cluster_from_proto(c) for c in msg.clusters),
        pinned_cpus=tuple(msg.pinned_cpus),
        board_model=msg.board_model,
        soc=msg.soc,
        product_model=msg.product_model,
        build_fingerprint=msg.build_fingerprint,
    )


def measurement_from_proto(reply: pb.MeasureResponse, spec: LayerSpec | None, request_id: str,
                           model_sha256: str | None = None, index: int = -1) -> Measurement:
    """A timing reply; `request_id` stands in when the reply carries none."""
    return Measurement(
        request_id=reply.request_id or request_id,
        spec=spec,
        timing=shared.timing_from_proto(reply.timing),
        conditions=shared.conditions_from_proto(reply.conditions),
        started_unix_ns=reply.started_unix_ns,
        finished_unix_ns=reply.finished_unix_ns,
        config_hash=reply.config_hash,
        model_sha256=model_sha256,
        state=shared.device_state_from_proto(reply.device_state),
        index=index,
    )


def result_from_proto(reply: pb.MeasureResponse, spec: LayerSpec, index: int) -> MeasureResult:
    """A MeasureStream reply: a `MeasureFailure` when its in-band status is set (the code name
    and message the same call would have ended with), else a `Measurement`."""
    if reply.HasField("status"):
        return MeasureFailure(request_id=reply.request_id, spec=spec,
                              code=shared.status_code_name(reply.status),
                              message=reply.status.message, index=index)
    return measurement_from_proto(reply, spec, reply.request_id, index=index)
