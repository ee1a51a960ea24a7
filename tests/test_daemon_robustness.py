"""The daemon keeps serving through what a phone on a desk does to it: ONNX Runtime crashing
or hanging mid-measurement (its worker process is killed and restarted, the call answered
INTERNAL), a client vanishing mid-stream, a client that never reads its results."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from device_server import wire
from device_server.measurer import Limits
from device_server.server import RunningServer, ServerConfig, running_server
from device_server.spec import LayerSpec, MeasurePolicy
from host.device.client import DeviceClient, DeviceError
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY

CONV = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=64, kernel=3, padding=1)
SLOW = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=40, min_repeat_ms=50)  # ~2 s


@pytest.fixture()
def own_daemon() -> Iterator[RunningServer]:
    config = ServerConfig(limits=Limits(max_measure_s=10, hang_grace_s=1.0), grace_s=0.5)
    with running_server(config) as server:
        yield server


def _measure_in_background(address: str, policy: MeasurePolicy) -> tuple[threading.Thread,
                                                                         list[object]]:
    out: list[object] = []

    def run() -> None:
        with DeviceClient(address, timeout_s=60, retries=0) as client:
            try:
                out.append(client.measure(CONV, policy=policy))
            except DeviceError as exc:
                out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_busy(server: RunningServer) -> None:
    deadline = time.monotonic() + 20
    while server.service.measurer.queue.depth == 0:  # not yet holding the device
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # past session creation, into the timed runs


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL])
def test_a_crash_in_onnx_runtime_costs_one_measurement_not_the_daemon(
        own_daemon: RunningServer, sig: signal.Signals) -> None:
    worker = own_daemon.service.measurer.worker
    first_pid = worker.pid
    assert first_pid is not None and first_pid != os.getpid()
    thread, out = _measure_in_background(own_daemon.address, SLOW)
    _wait_busy(own_daemon)
    os.kill(first_pid, sig)
    thread.join(60)
    (error,) = out
    assert isinstance(error, DeviceError) and error.code == "INTERNAL"
    assert f"killed by {sig.name}" in error.message and "restarted" in error.message
    assert CONV.describe() in error.message  # names the config that crashed it
    assert worker.pid not in (None, first_pid) and worker.restarts == 1
    with DeviceClient(own_daemon.address) as client:
        assert client.measure(CONV, policy=FAST_POLICY).timing.median_ms > 0


def test_a_hung_measurement_is_killed_after_its_budget(own_daemon: RunningServer) -> None:
    worker = own_daemon.service.measurer.worker
    pid = worker.pid
    assert pid is not None
    thread, out = _measure_in_background(own_daemon.address, SLOW)
    _wait_busy(own_daemon)
    os.kill(pid, signal.SIGSTOP)  # stands for a kernel that never returns
    t0 = time.monotonic()
    thread.join(60)
    (error,) = out
    assert isinstance(error, DeviceError) and error.code == "INTERNAL"
    assert "did not finish within" in error.message
    assert time.monotonic() - t0 < 20  # the budget (10 s cap) plus grace, not forever
    with DeviceClient(own_daemon.address) as client:
        assert client.measure(CONV, policy=FAST_POLICY).timing.median_ms > 0


def _stream_requests(n: int) -> Iterator[pb.MeasureRequest]:
    for i in range(n):
        yield pb.MeasureRequest(request_id=str(i), layer=wire.layer_to_proto(CONV),
                                policy=wire.policy_to_proto(FAST_POLICY))


def test_a_client_vanishing_mid_stream_releases_the_device(own_daemon: RunningServer) -> None:
    with grpc.insecure_channel(own_daemon.address) as channel:
        call = pb_grpc.DeviceServiceStub(channel).MeasureStream(_stream_requests(200), timeout=60)
        next(call)  # the stream is running
        call.cancel()
    deadline = time.monotonic() + 10
    while own_daemon.service.measurer.queue.depth:  # the abandoned items leave the queue
        assert time.monotonic() < deadline, "a vanished client kept the device"
        time.sleep(0.05)
    with DeviceClient(own_daemon.address) as client:
        assert client.measure(CONV, policy=FAST_POLICY).timing.median_ms > 0


def test_a_client_that_never_reads_does_not_block_others(own_daemon: RunningServer) -> None:
    with grpc.insecure_channel(own_daemon.address) as channel:
        call = pb_grpc.DeviceServiceStub(channel).MeasureStream(_stream_requests(300), timeout=60)
        time.sleep(0.5)  # it measures; nobody reads its answers
        with DeviceClient(own_daemon.address, timeout_s=30) as other:
            t0 = time.monotonic()
            assert other.measure(CONV, policy=FAST_POLICY).timing.median_ms > 0
            assert time.monotonic() - t0 < 10
        call.cancel()
