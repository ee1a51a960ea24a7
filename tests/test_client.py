"""DeviceClient and the embedded local daemon against the real daemon on loopback.

Retry bounds are checked against a small scripted servicer that counts attempts; everything
else talks to the real `device_server` (ONNX Runtime timings included).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_server.server import RunningServer, ServerConfig, running_server
from device_server.spec import LayerSpec, OpKind, SessionSpec
from host.device.client import (
    DeviceClient,
    DeviceError,
    MeasureFailure,
    Measurement,
)
from host.device.local_daemon import DaemonStartError, start_local_daemon
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY

CONV = LayerSpec.create("conv2d", (1, 16, 28, 28), out_channels=32, kernel=3, padding=1)
DWCONV = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=32, kernel=3, padding=1,
                          groups=32, batch_norm=True, activation="relu6")
LINEAR = LayerSpec.create("linear", (1, 256), out_channels=100)
POOL = LayerSpec.create("max_pool", (1, 16, 28, 28), kernel=2, stride=2)
# Built without validation, so that only the daemon can refuse it.
INVALID = LayerSpec(op=OpKind.LINEAR, input_shape=(1, 64), out_channels=0)
HUGE = LayerSpec.create("conv2d", (1, 512, 224, 224), out_channels=512, kernel=7, padding=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gemm_model(in_features: int, out_features: int) -> bytes:
    """y = x @ W with W an initializer: in*out*4 bytes of weights."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((in_features, out_features), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def client(daemon: RunningServer) -> Iterator[DeviceClient]:
    with DeviceClient(daemon.address, timeout_s=30.0) as c:
        yield c


# -- real daemon --------------------------------------------------------------------------------
def test_wait_ready_and_device_info(client: DeviceClient) -> None:
    client.wait_ready(timeout_s=5)
    info = client.device_info()
    assert info.fingerprint
    assert "CPUExecutionProvider" in info.providers
    assert info.default_threads >= 1
    assert info.max_queue_depth >= 1
    assert info.to_dict()["providers"] == list(info.providers)


def test_measure_returns_a_tagged_distribution(client: DeviceClient) -> None:
    m = client.measure(CONV, SessionSpec(intra_op_threads=1), FAST_POLICY)
    assert isinstance(m, Measurement)
    assert m.spec == CONV and m.request_id and m.config_hash
    assert m.timing.samples_count == FAST_POLICY.repeat == len(m.timing.samples_ms)
    assert 0 < m.timing.min_ms <= m.timing.median_ms <= m.timing.p90_ms <= m.timing.max_ms
    assert m.latency_ms == m.timing.robust_ms == m.timing.value_ms > 0
    assert m.conditions.provider == "CPUExecutionProvider"
    assert m.conditions.intra_op_threads == 1
    assert m.conditions.device_fingerprint == client.device_info().fingerprint
    assert 0 < m.started_unix_ns <= m.finished_unix_ns
    assert m.to_dict()["config"] == CONV.to_dict()


def test_measure_refusals_are_device_errors(client: DeviceClient) -> None:
    with pytest.raises(DeviceError) as exc:
        client.measure(INVALID, policy=FAST_POLICY)
    assert exc.value.code == "INVALID_ARGUMENT"
    assert "out_channels" in exc.value.message
    assert str(exc.value).startswith("INVALID_ARGUMENT: ")
    with pytest.raises(DeviceError) as exc:
        client.measure(CONV, SessionSpec(provider="NoSuchExecutionProvider"), FAST_POLICY)
    assert exc.value.code == "FAILED_PRECONDITION"
    assert "NoSuchExecutionProvider" in exc.value.message


def test_measure_many_yields_each_item_once_in_answer_order(client: DeviceClient) -> None:
    specs = [CONV, DWCONV, LINEAR, POOL, CONV]
    seen: list[Measurement | MeasureFailure] = []
    results = list(client.measure_many(specs, policy=FAST_POLICY, on_result=seen.append))
    assert seen == results
    assert len(results) == len(specs)
    assert len({r.request_id for r in results}) == len(specs)
    by_index = {r.index: r for r in results}
    assert sorted(by_index) == list(range(len(specs)))
    assert [by_index[i].spec for i in range(len(specs))] == specs  # each index is its own spec
    assert all(isinstance(r, Measurement) for r in results)
    measured = [r for r in results if isinstance(r, Measurement)]
    starts = [r.started_unix_ns for r in measured]
    assert starts == sorted(starts)  # yielded in the order the daemon measured them
    assert measured[0].config_hash == measured[4].config_hash  # same config, same identity


def test_bad_items_do_not_stop_the_stream(client: DeviceClient) -> None:
    specs = [LINEAR, INVALID, CONV, HUGE, POOL]
    results = list(client.measure_many(specs, policy=FAST_POLICY))
    assert [type(r) for r in results] == [
        Measurement, MeasureFailure, Measurement, MeasureFailure, Measurement
    ]
    bad, huge = results[1], results[3]
    assert isinstance(bad, MeasureFailure) and isinstance(huge, MeasureFailure)
    assert (bad.spec, bad.code) == (INVALID, "INVALID_ARGUMENT")
    assert "out_channels" in bad.message
    assert (huge.spec, huge.code) == (HUGE, "RESOURCE_EXHAUSTED")
    assert str(bad.to_error()) == f"INVALID_ARGUMENT: {bad.message}"


def test_measure_many_of_nothing(client: DeviceClient) -> None:
    assert list(client.measure_many([], policy=FAST_POLICY)) == []


def test_breaking_off_a_stream_leaves_the_client_usable(client: DeviceClient) -> None:
    stream = client.measure_many([LINEAR] * 20, policy=FAST_POLICY)
    first = next(stream)
    assert isinstance(first, Measurement)
    stream.close()  # type: ignore[attr-defined]  # cancels the call
    assert isinstance(client.measure(LINEAR, policy=FAST_POLICY), Measurement)


def test_overhead(client: DeviceClient) -> None:
    t = client.overhead(policy=FAST_POLICY)
    assert t.samples_count == FAST_POLICY.repeat
    assert t.median_ms > 0


def test_big_model_is_sent_in_chunks_once_and_measured_by_reference(
    daemon: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = gemm_model(1100, 1000)  # 4.4 MB of weights: over gRPC's default 4 MiB message
    assert len(data) > 4 * 2**20
    sha = hashlib.sha256(data).hexdigest()
    with DeviceClient(daemon.address, timeout_s=60) as client:
        calls: list[list[pb.ModelChunk]] = []
        real_upload = client._stub.UploadModel

        def counting_upload(chunks: Iterator[pb.ModelChunk], **kwargs: Any) -> Any:
            sent: list[pb.ModelChunk] = []
            calls.append(sent)

            def tee() -> Iterator[pb.ModelChunk]:
                for chunk in chunks:
                    sent.append(chunk)
                    yield chunk

            return real_upload(tee(), **kwargs)

        monkeypatch.setattr(client._stub, "UploadModel", counting_upload)
        assert not client.has_model(sha)
        assert client.upload_model(data, chunk_bytes=512 * 1024) == sha
        assert client.has_model(sha)
        (chunks,) = calls
        assert len(chunks) == -(-len(data) // (512 * 1024))
        assert chunks[0].sha256 == sha and chunks[0].total_bytes == len(data)
        assert all(not c.sha256 and not c.total_bytes for c in chunks[1:])
        assert all(len(c.data) == 512 * 1024 for c in chunks[:-1])
        assert b"".join(c.data for c in chunks) == data

        assert client.upload_model(data) == sha  # HasModel says it is there: nothing sent
        m = client.measure_model(sha, policy=FAST_POLICY, input_shapes={"x": [2, 1100]})
        m2 = client.measure_model(data, policy=FAST_POLICY)  # bytes: uploaded only if missing
        assert len(calls) == 1
        for measured in (m, m2):
            assert measured.spec is None and measured.model_sha256 == sha
            assert measured.timing.samples_count == FAST_POLICY.repeat
            assert measured.timing.median_ms > 0


def test_upload_arguments_and_refusals(client: DeviceClient) -> None:
    for size in (1024, 4 * 2**20):
        with pytest.raises(ValueError, match="chunk_bytes"):
            client.upload_model(b"x" * 10, chunk_bytes=size)
    with pytest.raises(ValueError, match="empty"):
        client.upload_model(b"")
    with pytest.raises(DeviceError) as exc:
        client.upload_model(b"this is not an onnx model" * 100)
    assert exc.value.code == "INVALID_ARGUMENT"
    assert "ONNX" in exc.value.message
    with pytest.raises(DeviceError) as exc:
        client.measure_model("0" * 64, policy=FAST_POLICY)
    assert exc.value.code == "NOT_FOUND"
    with pytest.raises(ValueError, match="SHA-256"):
        client.measure_model("model.onnx", policy=FAST_POLICY)


# -- connection failures and retries ------------------------------------------------------------
def test_unreachable_address_names_it_and_says_what_to_check() -> None:
    address = f"127.0.0.1:{free_port()}"
    with DeviceClient(address, retries=1, backoff_s=0.05, timeout_s=5) as client:
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as exc:
            client.device_info()
        assert time.monotonic() - t0 < 5
        assert exc.value.code == "UNAVAILABLE"
        assert address in exc.value.message
        assert "daemon is running" in exc.value.message
        with pytest.raises(DeviceError) as exc:
            list(client.measure_many([LINEAR], policy=FAST_POLICY))
        assert exc.value.code == "UNAVAILABLE" and address in exc.value.message
        with pytest.raises(DeviceError, match="not ready"):
            client.wait_ready(timeout_s=0.5)


def test_retries_until_a_late_daemon_comes_up(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    up, done = threading.Event(), threading.Event()

    def serve_late() -> None:
        time.sleep(0.5)
        with running_server(ServerConfig(port=port, grace_s=0.5)):
            up.set()
            done.wait(30)

    thread = threading.Thread(target=serve_late, daemon=True)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="host.device.client"):
            with DeviceClient(f"127.0.0.1:{port}", retries=8, backoff_s=0.1) as client:
                assert not up.is_set()
                m = client.measure(LINEAR, policy=FAST_POLICY)
        assert isinstance(m, Measurement)
        assert any("UNAVAILABLE" in r.getMessage() for r in caplog.records)
    finally:
        done.set()
        thread.join(10)


class _Scripted(pb_grpc.DeviceServiceServicer):
    """Fails as told and counts attempts, to check the client's retry policy exactly."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.unavailable_first = 0  # GetDeviceInfo: this many UNAVAILABLE answers, then success
        self.streams: list[list[str]] = []

    def _count(self, name: str) -> int:
        self.attempts[name] = self.attempts.get(name, 0) + 1
        return self.attempts[name]

    def GetDeviceInfo(self, request: Any, context: grpc.ServicerContext) -> pb.DeviceInfo:
        if self._count("GetDeviceInfo") <= self.unavailable_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.DeviceInfo(fingerprint="scripted", providers=["CPUExecutionProvider"])

    def HasModel(self, request: Any, context: grpc.ServicerContext) -> pb.HasModelResponse:
        self._count("HasModel")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad digest")
        raise AssertionError("abort() raises")

    def MeasureStream(self, requests: Iterator[pb.MeasureRequest], context: Any) -> Any:
        """First stream: answers one item, then drops (UNAVAILABLE); later streams: all."""
        first = not self.streams
        ids: list[str] = []
        self.streams.append(ids)
        for request in requests:
            ids.append(request.request_id)
            if first and len(ids) == 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield pb.MeasureResponse(
                request_id=request.request_id,
                timing=pb.TimingStats(median_ms=1.0, samples_count=1),
            )


@pytest.fixture()
def scripted() -> Iterator[tuple[_Scripted, str]]:
    servicer = _Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_retries_are_bounded_and_only_for_unavailable(scripted: tuple[_Scripted, str]) -> None:
    servicer, address = scripted
    with DeviceClient(address, retries=2, backoff_s=0.01) as client:
        servicer.unavailable_first = 2
        assert client.device_info().fingerprint == "scripted"
        assert servicer.attempts["GetDeviceInfo"] == 3

        servicer.attempts.clear()
        servicer.unavailable_first = 100
        with pytest.raises(DeviceError) as exc:
            client.device_info()
        assert exc.value.code == "UNAVAILABLE"
        assert servicer.attempts["GetDeviceInfo"] == 3  # 1 + retries, then give up

        with pytest.raises(DeviceError) as exc:
            client.has_model("0" * 64)
        assert (exc.value.code, exc.value.message) == ("INVALID_ARGUMENT", "bad digest")
        assert servicer.attempts["HasModel"] == 1  # never retried


def test_dropped_stream_resends_only_unanswered_items(scripted: tuple[_Scripted, str]) -> None:
    servicer, address = scripted
    specs = [CONV, LINEAR, POOL, DWCONV]
    with DeviceClient(address, retries=2, backoff_s=0.01) as client:
        results = list(client.measure_many(specs, policy=FAST_POLICY))
    assert [r.spec for r in results] == specs  # each once, none lost
    answered_first = servicer.streams[0][0]
    assert answered_first not in servicer.streams[1]
    assert len(servicer.streams[1]) == len(specs) - 1


def test_dropped_stream_without_retries_raises_after_the_answered_items(
    scripted: tuple[_Scripted, str],
) -> None:
    servicer, address = scripted
    results = []
    with DeviceClient(address, retries=0) as client:
        with pytest.raises(DeviceError) as exc:
            for r in client.measure_many([CONV, LINEAR, POOL], policy=FAST_POLICY):
                results.append(r)
    assert exc.value.code == "UNAVAILABLE"
    assert [r.spec for r in results] == [CONV]  # what was answered stays valid
    assert len(servicer.streams) == 1


# -- authentication -----------------------------------------------------------------------------
def test_token_auth() -> None:
    with running_server(ServerConfig(token="s3cret", grace_s=0.5)) as server:
        with DeviceClient(server.address, token="s3cret", retries=0) as good:
            good.wait_ready(timeout_s=5)
            assert good.device_info().fingerprint
            assert isinstance(good.measure(LINEAR, policy=FAST_POLICY), Measurement)
        with DeviceClient(server.address, retries=0) as anonymous:
            anonymous.wait_ready(timeout_s=5)  # health answers probes without credentials
            with pytest.raises(DeviceError) as exc:
                anonymous.device_info()
            assert exc.value.code == "UNAUTHENTICATED"
            assert "token" in exc.value.message
            with pytest.raises(DeviceError) as exc:
                list(anonymous.measure_many([LINEAR], policy=FAST_POLICY))
            assert exc.value.code == "UNAUTHENTICATED"
        with DeviceClient(server.address, token="wrong", retries=0) as wrong:
            with pytest.raises(DeviceError) as exc:
                wrong.measure(LINEAR, policy=FAST_POLICY)
            assert exc.value.code == "UNAUTHENTICATED"
            with pytest.raises(DeviceError) as exc:
                wrong.upload_model(gemm_model(4, 4))
            assert exc.value.code == "UNAUTHENTICATED"


# -- the embedded local daemon ------------------------------------------------------------------
def test_local_daemon_lifecycle() -> None:
    with start_local_daemon(threads=1, token="tok") as local:
        assert local.running
        assert local.address == f"127.0.0.1:{local.port}"
        with local.client(timeout_s=30) as client:
            assert client.device_info().default_threads == 1
            assert isinstance(client.measure(LINEAR, policy=FAST_POLICY), Measurement)
        with DeviceClient(local.address, retries=0) as anonymous:
            with pytest.raises(DeviceError, match="UNAUTHENTICATED"):
                anonymous.device_info()
        process = local.process
    assert process.returncode == 0  # SIGTERM: a graceful stop
    assert not local.workdir.exists()
    with DeviceClient(local.address, retries=0, timeout_s=2) as client:
        with pytest.raises(DeviceError, match="UNAVAILABLE"):
            client.device_info()
    assert local.stop() == 0  # idempotent


def test_local_daemon_that_cannot_start_reports_its_log() -> None:
    with pytest.raises(DaemonStartError) as exc:
        start_local_daemon(extra_args=["--no-such-option"], startup_timeout_s=30)
    assert "exited with code 2" in str(exc.value)
    assert "--no-such-option" in str(exc.value)


def test_client_side_needs_no_torch() -> None:
    code = (
        "import sys, host.device.client, host.device.local_daemon, host.cli.netadapt_bench; "
        "sys.exit('torch' in sys.modules or 'onnx' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
