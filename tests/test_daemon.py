"""The measurement daemon over real gRPC on loopback: health, reflection, timings that agree with
in-process ONNX Runtime, serialised measurements, bounds and every kind of bad input."""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from device_server import wire
from device_server.builder import build_layer_model
from device_server.measurer import Limits
from device_server.server import SERVICE_NAME, RunningServer, ServerConfig, running_server
from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from device_server.timer import TimeBudget, create_session, time_callable
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY

CONV = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=64, kernel=3, padding=1,
                        batch_norm=True, activation="relu")


def _request(spec: LayerSpec, policy: MeasurePolicy = FAST_POLICY, rid: str = "r",
             **session: object) -> pb.MeasureRequest:
    return pb.MeasureRequest(
        request_id=rid,
        layer=wire.layer_to_proto(spec),
        policy=wire.policy_to_proto(policy),
        session=pb.SessionOptions(**session),  # type: ignore[arg-type]
    )


def _code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[no-any-return]


def _still_serving(stub: pb_grpc.DeviceServiceStub) -> None:
    reply = stub.Measure(_request(CONV), timeout=30)
    assert reply.timing.median_ms > 0


def test_health_is_serving(daemon: RunningServer) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(daemon: RunningServer) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE_NAME in services
        assert "grpc.health.v1.Health" in services
        desc = db.FindFileContainingSymbol(SERVICE_NAME)
        assert desc.package == "netadapt.v1"


def test_device_info_describes_the_device(stub: pb_grpc.DeviceServiceStub) -> None:
    info = stub.GetDeviceInfo(pb.GetDeviceInfoRequest(), timeout=5)
    assert len(info.fingerprint) == 16
    assert info.cpu_count >= 1
    assert "CPUExecutionProvider" in info.providers
    assert info.ort_version and info.daemon_version
    assert info.max_queue_depth > 0
    assert info.device_state.HasField("load")  # readable on every Linux


def test_conv_measured_over_grpc_carries_distribution_and_conditions(
    stub: pb_grpc.DeviceServiceStub,
) -> None:
    reply = stub.Measure(_request(CONV, rid="conv-1"), timeout=30)
    t = reply.timing
    assert reply.request_id == "conv-1"
    assert t.samples_count == FAST_POLICY.repeat == len(t.samples_ms)
    assert t.min_ms <= t.median_ms <= t.p90_ms <= t.max_ms
    assert t.number >= 1 and t.warmup_runs >= FAST_POLICY.warmup_runs
    assert reply.conditions.provider == "CPUExecutionProvider"
    assert reply.conditions.intra_op_threads == 1
    assert reply.finished_unix_ns > reply.started_unix_ns


def test_grpc_median_agrees_with_in_process_timing(stub: pb_grpc.DeviceServiceStub) -> None:
    """Interleaved passes, so drift on this shared machine hits both sides alike."""
    policy = MeasurePolicy(warmup_runs=5, min_warmup_ms=20, repeat=15, min_repeat_ms=5)
    prepared = create_session(build_layer_model(CONV).SerializeToString(),
                              SessionSpec(intra_op_threads=1))
    remote: list[float] = []
    local: list[float] = []
    spreads: list[float] = []
    for _ in range(3):
        r = stub.Measure(_request(CONV, policy), timeout=60).timing
        l_ = time_callable(prepared.run, policy, TimeBudget(cap_s=60))
        remote.append(r.median_ms)
        local.append(l_.median_ms)
        spreads += [(r.p90_ms - r.min_ms) / r.median_ms, l_.rel_spread]
    ratio = statistics.median(remote) / statistics.median(local)
    tolerance = 0.10 + 2 * statistics.median(spreads)
    assert abs(ratio - 1) <= tolerance, (remote, local, tolerance)


def test_overhead_is_far_below_a_layer(stub: pb_grpc.DeviceServiceStub) -> None:
    over = stub.MeasureOverhead(
        pb.MeasureOverheadRequest(policy=wire.policy_to_proto(FAST_POLICY)), timeout=30
    )
    conv = stub.Measure(_request(CONV), timeout=30)
    assert 0 < over.timing.median_ms < conv.timing.median_ms


def test_stream_answers_in_order_with_ids_and_in_band_errors(
    stub: pb_grpc.DeviceServiceStub,
) -> None:
    specs = [LayerSpec.create("conv2d", (1, c, 14, 14), out_channels=c, kernel=3, padding=1,
                              groups=c)
             for c in (8, 16, 24)]
    bad = pb.MeasureRequest(request_id="bad", layer=pb.LayerConfig(
        op=pb.CONV2D, input_shape=[1, 6, 8, 8], out_channels=8, groups=4))
    requests = [_request(specs[0], rid="a"), bad, _request(specs[1], rid="b"),
                _request(specs[2], rid="c")]
    replies = list(stub.MeasureStream(iter(requests), timeout=60))
    assert [r.request_id for r in replies] == ["a", "bad", "b", "c"]
    # In-band, a google.rpc.Status: the code and message the call alone would have ended with.
    assert replies[1].HasField("status") and not replies[1].HasField("timing")
    assert replies[1].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "divisible by groups" in replies[1].status.message
    assert not any(r.HasField("status") for i, r in enumerate(replies) if i != 1)
    assert all(r.timing.median_ms > 0 for i, r in enumerate(replies) if i != 1)
    starts = [r.started_unix_ns for i, r in enumerate(replies) if i != 1]
    assert starts == sorted(starts)


def test_concurrent_clients_never_overlap(daemon: RunningServer) -> None:
    intervals: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    policy = MeasurePolicy(warmup_runs=2, min_warmup_ms=5, repeat=8, min_repeat_ms=2)

    def client(worker: int) -> None:
        try:
            with grpc.insecure_channel(daemon.address) as channel:
                s = pb_grpc.DeviceServiceStub(channel)
                for i in range(3):
                    spec = LayerSpec.create("conv2d", (1, 8 * (worker + 1), 16, 16),
                                            out_channels=16 + i, kernel=3, padding=1)
                    r = s.Measure(_request(spec, policy), timeout=60)
                    intervals.append((r.started_unix_ns, r.finished_unix_ns))
        except BaseException as exc:  # surfaced below; a thread cannot fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(intervals) == 12
    intervals.sort()
    for (_, end), (start, _) in zip(intervals, intervals[1:], strict=False):
        assert start >= end, "two measurements held the device at the same time"


@pytest.mark.parametrize(
    ("layer", "session", "code", "message"),
    [
        (pb.LayerConfig(op=pb.CONV2D, input_shape=[1, 3, -2, 8], out_channels=8), {},
         grpc.StatusCode.INVALID_ARGUMENT, "positive"),
        (pb.LayerConfig(op=pb.CONV2D, input_shape=[1, 3, 8, 8], out_channels=0), {},
         grpc.StatusCode.INVALID_ARGUMENT, "out_channels > 0"),
        (pb.LayerConfig(op=pb.CONV2D, input_shape=[1, 6, 8, 8], out_channels=8, groups=4), {},
         grpc.StatusCode.INVALID_ARGUMENT, "divisible by groups"),
        (pb.LayerConfig(op=pb.CONV2D, input_shape=[1, 3, 4, 4], out_channels=8, kernel=[9]), {},
         grpc.StatusCode.INVALID_ARGUMENT, "larger than the padded input"),
        (pb.LayerConfig(op=99, input_shape=[1, 3, 4, 4]), {},  # type: ignore[arg-type]
         grpc.StatusCode.INVALID_ARGUMENT, "unknown or unset op kind"),
        (pb.LayerConfig(input_shape=[1, 3, 4, 4]), {},
         grpc.StatusCode.INVALID_ARGUMENT, "unknown or unset op kind"),
        (wire.layer_to_proto(CONV), {"provider": "NoSuchExecutionProvider"},
         grpc.StatusCode.FAILED_PRECONDITION, "available: "),
        (wire.layer_to_proto(CONV), {"intra_op_threads": -1},
         grpc.StatusCode.INVALID_ARGUMENT, "intra_op_threads"),
        (pb.LayerConfig(op=pb.CONV2D, input_shape=[64, 512, 512, 512], out_channels=512,
                        kernel=[3], padding=[1]), {},
         grpc.StatusCode.RESOURCE_EXHAUSTED, "MiB of tensors"),
    ],
)
def test_bad_layer_requests_get_a_clear_status_and_the_daemon_goes_on(
    stub: pb_grpc.DeviceServiceStub,
    layer: pb.LayerConfig,
    session: dict[str, object],
    code: grpc.StatusCode,
    message: str,
) -> None:
    request = pb.MeasureRequest(layer=layer, session=pb.SessionOptions(**session),  # type: ignore[arg-type]
                                policy=wire.policy_to_proto(FAST_POLICY))
    with pytest.raises(grpc.RpcError) as exc:
        stub.Measure(request, timeout=30)
    assert _code(exc) == code
    assert message in exc.value.details()
    # The same refusal as a google.rpc.Status in the call's details (what grpcio-status reads).
    status = rpc_status.from_call(exc.value)  # type: ignore[arg-type]
    assert status is not None and status.code == code.value[0]
    assert status.message == exc.value.details()
    _still_serving(stub)


def test_bad_policy_is_refused(stub: pb_grpc.DeviceServiceStub) -> None:
    request = _request(CONV)
    request.policy.repeat = -3
    with pytest.raises(grpc.RpcError) as exc:
        stub.Measure(request, timeout=10)
    assert _code(exc) == grpc.StatusCode.INVALID_ARGUMENT
    assert "repeat must be >= 1" in exc.value.details()


def _chunks(blob: bytes, sha: str, size: int = 256 * 1024) -> Iterator[pb.ModelChunk]:
    for i in range(0, max(len(blob), 1), size):
        first = i == 0
        yield pb.ModelChunk(sha256=sha if first else "", total_bytes=len(blob) if first else 0,
                            data=blob[i:i + size])


def _big_model_bytes() -> bytes:
    # 1024 x 1536 float32 weights: 6 MiB, above gRPC's default 4 MiB message limit.
    spec = LayerSpec.create("linear", (1, 1536), out_channels=1024)
    return build_layer_model(spec).SerializeToString()


def test_model_over_4_mib_uploads_in_chunks_and_measures_by_reference(
    stub: pb_grpc.DeviceServiceStub,
) -> None:
    blob = _big_model_bytes()
    assert len(blob) > 4 * 2**20
    sha = hashlib.sha256(blob).hexdigest()
    assert not stub.HasModel(pb.ModelRef(sha256=sha), timeout=5).present
    reply = stub.UploadModel(_chunks(blob, sha), timeout=60)
    assert (reply.sha256, reply.size_bytes) == (sha, len(blob))
    assert stub.HasModel(pb.ModelRef(sha256=sha), timeout=5).present
    measured = stub.MeasureModel(
        pb.MeasureModelRequest(request_id="m", sha256=sha,
                               policy=wire.policy_to_proto(FAST_POLICY)), timeout=60)
    assert measured.request_id == "m" and measured.timing.median_ms > 0


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("hash_mismatch", grpc.StatusCode.INVALID_ARGUMENT, "not the announced"),
        ("not_onnx", grpc.StatusCode.INVALID_ARGUMENT, "not a valid ONNX model"),
        ("no_header", grpc.StatusCode.INVALID_ARGUMENT, "first chunk must carry"),
        ("short", grpc.StatusCode.INVALID_ARGUMENT, "of the announced"),
        ("huge_chunk", grpc.StatusCode.INVALID_ARGUMENT, "at most 1048576"),
        ("too_large", grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds this daemon's limit"),
    ],
)
def test_bad_uploads_are_refused(
    stub: pb_grpc.DeviceServiceStub, case: str, code: grpc.StatusCode, message: str
) -> None:
    blob = build_layer_model(CONV).SerializeToString()
    sha = hashlib.sha256(blob).hexdigest()
    chunks: list[pb.ModelChunk]
    if case == "hash_mismatch":
        chunks = list(_chunks(blob, hashlib.sha256(b"other").hexdigest()))
    elif case == "not_onnx":
        junk = b"this is not an onnx model" * 100
        chunks = list(_chunks(junk, hashlib.sha256(junk).hexdigest()))
    elif case == "no_header":
        chunks = [pb.ModelChunk(data=blob)]
    elif case == "short":
        chunks = [pb.ModelChunk(sha256=sha, total_bytes=len(blob) + 10, data=blob)]
    elif case == "huge_chunk":
        big = _big_model_bytes()
        chunks = [pb.ModelChunk(sha256=hashlib.sha256(big).hexdigest(), total_bytes=len(big),
                                data=big[: 2 * 2**20])]
    else:
        chunks = [pb.ModelChunk(sha256=sha, total_bytes=2**40, data=blob)]
    with pytest.raises(grpc.RpcError) as exc:
        stub.UploadModel(iter(chunks), timeout=30)
    assert _code(exc) == code
    assert message in exc.value.details()
    _still_serving(stub)


def test_measuring_an_unknown_model_says_to_upload_first(stub: pb_grpc.DeviceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        stub.MeasureModel(pb.MeasureModelRequest(sha256="0" * 64), timeout=10)
    assert _code(exc) == grpc.StatusCode.NOT_FOUND
    assert "upload it first" in exc.value.details()


def test_time_cap_refuses_before_running_long() -> None:
    config = ServerConfig(limits=Limits(max_measure_s=0.5), grace_s=0.5)
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        s = pb_grpc.DeviceServiceStub(channel)
        policy = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=1000, min_repeat_ms=50)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            s.Measure(_request(CONV, policy), timeout=30)
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the daemon's cap" in exc.value.details()
        assert time.monotonic() - t0 < 5, "the refused measurement was run anyway"


def test_client_deadline_is_honoured(stub: pb_grpc.DeviceServiceStub) -> None:
    policy = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=200, min_repeat_ms=20)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as exc:
        stub.Measure(_request(CONV, policy), timeout=1.0)
    assert _code(exc) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3
    _still_serving(stub)


def test_full_queue_is_refused() -> None:
    config = ServerConfig(limits=Limits(max_queue_depth=1), grace_s=0.5)
    slow = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=40, min_repeat_ms=25)
    with running_server(config) as server, grpc.insecure_channel(server.address) as channel:
        s = pb_grpc.DeviceServiceStub(channel)
        first = s.Measure.future(_request(CONV, slow), timeout=60)
        time.sleep(0.3)  # let it take the device
        with pytest.raises(grpc.RpcError) as exc:
            s.Measure(_request(CONV), timeout=30)
        assert _code(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in exc.value.details()
        assert first.result().timing.median_ms > 0


def test_a_second_daemon_on_a_taken_port_is_refused(daemon: RunningServer) -> None:
    from device_server.server import create_server

    with pytest.raises((ValueError, RuntimeError), match="bind|in use"):
        create_server(ServerConfig(port=daemon.port))
