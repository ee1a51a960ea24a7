"""Cancellation reaches the device: a measurement nobody waits for any more (its client process
killed, its stream gone, its deadline passed) is abandoned — dropped from the queue, or
interrupted in the worker — and the next client gets the device within the bound the daemon
promises (`Limits.cancel_grace_s`, plus a worker restart when an interrupt is not enough).

Real daemon on loopback, real client processes killed with SIGKILL mid-measurement; waits are
read from the daemon's own timestamps (`started_unix_ns` of the next client's measurement)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from device_server import wire
from device_server.measurer import Limits
from device_server.server import RunningServer, ServerConfig, running_server
from device_server.spec import LayerSpec, MeasurePolicy
from host.device.client import DeviceClient, DeviceError, Measurement
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY

ROOT = Path(__file__).resolve().parents[1]
CONV = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=64, kernel=3, padding=1)
# the next client's
SMALL = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=3, padding=1)
LONG = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=400, min_repeat_ms=50)  # ~20 s
GRACE_S = 1.0
# What the daemon promises once a call has ended: noticing it (50 ms polls) and the interrupt
# grace; the rest is slack for a loaded 2-core machine.
BOUND_S = GRACE_S + 2.0

_CLIENT = """
import sys
from device_server import wire
from device_server.spec import LayerSpec, MeasurePolicy
from host.device.client import DeviceClient
spec = LayerSpec.from_dict(__import__("json").loads(sys.argv[2]))
policy = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=400, min_repeat_ms=50)
with DeviceClient(sys.argv[1], timeout_s=120, retries=0) as client:
    if sys.argv[3] == "stream":
        for _ in client.measure_many([spec] * 5, policy=policy):
            pass
    else:
        client.measure(spec, policy=policy)
"""


@pytest.fixture()
def server() -> Iterator[RunningServer]:
    config = ServerConfig(limits=Limits(cancel_grace_s=GRACE_S, hang_grace_s=30), grace_s=0.5)
    with running_server(config) as running:
        yield running


def _client_process(address: str, mode: str = "unary") -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", _CLIENT, address, CONV.key(), mode],
                            env=env, stdin=subprocess.DEVNULL)


def _wait_depth(server: RunningServer, depth: int, settle_s: float = 0.0) -> None:
    deadline = time.monotonic() + 60
    while server.service.measurer.queue.depth < depth:
        assert time.monotonic() < deadline, f"queue never reached depth {depth}"
        time.sleep(0.02)
    time.sleep(settle_s)


def _measure_in_thread(address: str, spec: LayerSpec = SMALL
                       ) -> tuple[threading.Thread, list[Measurement | DeviceError]]:
    out: list[Measurement | DeviceError] = []

    def run() -> None:
        with DeviceClient(address, timeout_s=120, retries=0) as client:
            try:
                out.append(client.measure(spec, policy=FAST_POLICY))
            except DeviceError as exc:
                out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _kill(proc: subprocess.Popen[bytes]) -> int:
    killed_ns = time.time_ns()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return killed_ns


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_a_killed_client_frees_the_device_within_the_bound(server: RunningServer,
                                                           mode: str) -> None:
    measurer = server.service.measurer
    worker_pid = measurer.worker.pid
    client = _client_process(server.address, mode)
    try:
        _wait_depth(server, 1, settle_s=1.5)  # its ~20 s measurement is running on the device
        waiting, out = _measure_in_thread(server.address)
        _wait_depth(server, 2)
        killed_ns = _kill(client)
        waiting.join(60)
    finally:
        client.kill()
    (result,) = out
    assert isinstance(result, Measurement), result
    waited_s = (result.started_unix_ns - killed_ns) / 1e9
    worker = measurer.worker
    state = (f"waited {waited_s:.2f} s; interrupted {worker.interrupted}, killed "
             f"{worker.killed_on_cancel}, abandoned {measurer.abandoned_running} running / "
             f"{measurer.abandoned_queued} queued")
    assert measurer.abandoned_running == 1, state
    if worker.killed_on_cancel == 0:
        # Stopped by the interrupt (the usual case): the worker and its sessions survived.
        assert worker.interrupted == 1 and worker.pid == worker_pid, state
        assert waited_s < BOUND_S, state
    else:  # a starved machine let the grace pass: the promise then includes a fresh worker
        assert worker.killed_on_cancel == 1 and waited_s < BOUND_S + 10.0, state


def test_a_killed_clients_queued_measurement_never_runs(server: RunningServer) -> None:
    measurer = server.service.measurer
    running = _client_process(server.address)
    _wait_depth(server, 1, settle_s=0.5)           # measuring
    queued = _client_process(server.address)
    try:
        _wait_depth(server, 2)                     # waiting behind it
        waiting, out = _measure_in_thread(server.address)
        _wait_depth(server, 3)
        _kill(queued)
        deadline = time.monotonic() + 10
        while measurer.abandoned_queued < 1:      # it leaves the line without running
            assert time.monotonic() < deadline, "a killed client's queued job stayed queued"
            time.sleep(0.02)
        killed_ns = _kill(running)
        waiting.join(60)
    finally:
        running.kill()
        queued.kill()
    (result,) = out
    assert isinstance(result, Measurement), result
    waited_s = (result.started_unix_ns - killed_ns) / 1e9
    restart_s = 10.0 if measurer.worker.killed_on_cancel else 0.0
    assert waited_s < BOUND_S + restart_s, f"waited {waited_s:.2f} s"
    assert measurer.abandoned_queued == 1 and measurer.abandoned_running == 1


def test_a_deadline_that_passes_mid_measurement_abandons_it(server: RunningServer) -> None:
    """The measurement fitted its deadline when it started, then the runtime stopped answering
    (SIGSTOP, standing for a kernel slower than its first run): at the deadline the daemon
    interrupts it, and, the worker not answering, kills and restarts the worker."""
    measurer = server.service.measurer
    worker_pid = measurer.worker.pid
    assert worker_pid is not None
    policy = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=40, min_repeat_ms=50)  # ~2 s
    first: list[object] = []

    def run() -> None:
        with DeviceClient(server.address, timeout_s=4.0, retries=0) as client:
            try:
                first.append(client.measure(CONV, policy=policy))
            except DeviceError as exc:
                first.append(exc)

    thread = threading.Thread(target=run)
    deadline_ns = time.time_ns() + 4_000_000_000
    thread.start()
    _wait_depth(server, 1, settle_s=0.5)
    os.kill(worker_pid, signal.SIGSTOP)
    waiting, out = _measure_in_thread(server.address)
    thread.join(60)
    waiting.join(60)
    (error,) = first
    assert isinstance(error, DeviceError) and error.code == "DEADLINE_EXCEEDED"
    (result,) = out
    assert isinstance(result, Measurement), result
    # From the first call's deadline: the interrupt's grace, then a fresh worker (~1 s here;
    # generous for a loaded machine, far below the 2 s job plus its 30 s hang grace).
    waited_s = (result.started_unix_ns - deadline_ns) / 1e9
    assert waited_s < BOUND_S + 5.0, f"waited {waited_s:.1f} s past the deadline"
    assert measurer.worker.killed_on_cancel == 1 and measurer.worker.pid != worker_pid


def test_a_measurement_that_cannot_meet_its_deadline_is_refused_up_front(
        server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.DeviceServiceStub(channel)
        request = pb.MeasureRequest(request_id="late", layer=wire.layer_to_proto(CONV),
                                    policy=wire.policy_to_proto(LONG))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Measure(request, timeout=5.0)
        assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = refused.value.details() or ""
        assert "the client's deadline leaves" in details and "raise the timeout" in details
        assert time.monotonic() - t0 < 4.0  # refused, not run until the deadline
    assert server.service.measurer.abandoned_running == 0
