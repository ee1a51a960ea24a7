"""The daemon's log is plain text a person can read on a phone: no terminal escape sequences (ONNX
Runtime's colour codes stripped), one line per request outcome with its request id, status and
the time it took, nothing a client sends can forge a line, and never the token."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_server import wire
from device_server.spec import LayerSpec
from host.device.client import DeviceClient, DeviceError
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "log-test-token-5f2c9e"
LINEAR = LayerSpec.create("linear", (1, 16), out_channels=16)
_OUTCOME = re.compile(r" (\S+) request (\S+) ([A-Z_]+) in (\d+\.\d{3}) s")


def _runtime_failing_model() -> bytes:
    """Valid ONNX that ONNX Runtime loads but cannot run (kernel_shape disagrees with W):
    its runtime prints a coloured error line."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[5, 5])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _request(rid: str, spec: LayerSpec = LINEAR) -> pb.MeasureRequest:
    return pb.MeasureRequest(request_id=rid, layer=wire.layer_to_proto(spec),
                             policy=wire.policy_to_proto(FAST_POLICY))


@pytest.fixture(scope="module")
def daemon_log(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Runs a token-protected daemon through a set of calls; returns its whole log."""
    folder = tmp_path_factory.mktemp("daemon")
    (folder / "token").write_text(TOKEN)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    with (folder / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_server", "serve", "--port", "0", "--port-file",
             "port", "--token-file", "token"],
            cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (folder / "port").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        address = f"127.0.0.1:{(folder / 'port').read_text().strip()}"
        _exercise(address)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return (folder / "daemon.log").read_bytes().decode("utf-8", "replace")


def _exercise(address: str) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DeviceServiceStub(channel)
        stub.Measure(_request("req-ok-1"), timeout=60, metadata=metadata)
        bad = pb.MeasureRequest(request_id="req-bad-2", layer=pb.LayerConfig(op=pb.CONV2D))
        with pytest.raises(grpc.RpcError):
            stub.Measure(bad, timeout=60, metadata=metadata)
        forged = "evil\n2099-01-01 00:00:00,000 INFO forged: \x1b[31mred"
        stub.Measure(_request(forged), timeout=60, metadata=metadata)
        replies = list(stub.MeasureStream(iter([_request("req-s-1"), _request("req-s-2")]),
                                          timeout=60, metadata=metadata))
        assert len(replies) == 2
        with pytest.raises(grpc.RpcError):  # a wrong token
            stub.Measure(_request("req-nope-3"), timeout=60,
                         metadata=(("authorization", "Bearer wrong"),))
    with DeviceClient(address, token=TOKEN, retries=0) as client:
        with pytest.raises(DeviceError) as failed:
            client.measure_model(_runtime_failing_model(), policy=FAST_POLICY)
        assert failed.value.code == "INVALID_ARGUMENT"  # the model's fault, not an internal one
        assert "kernel_shape is not compatible" in failed.value.message  # says what failed


def test_no_escape_sequences_and_no_token(daemon_log: str) -> None:
    assert "\x1b" not in daemon_log
    assert TOKEN not in daemon_log
    # ONNX Runtime's own (coloured) line came through, cleaned.
    assert re.search(r"\[E:onnxruntime:.*kernel_shape is not compatible", daemon_log)


def test_one_line_per_request_with_its_id_status_and_time(daemon_log: str) -> None:
    outcomes: dict[str, list[tuple[str, str, float]]] = {}
    for line in daemon_log.splitlines():
        m = _OUTCOME.search(line)
        if m:
            outcomes.setdefault(m.group(2), []).append((m.group(1), m.group(3),
                                                        float(m.group(4))))
    assert outcomes["req-ok-1"] == [("Measure", "OK", outcomes["req-ok-1"][0][2])]
    assert [(m, s) for m, s, _ in outcomes["req-bad-2"]] == [("Measure", "INVALID_ARGUMENT")]
    assert [(m, s) for m, s, _ in outcomes["req-s-1"]] == [("MeasureStream", "OK")]
    assert [(m, s) for m, s, _ in outcomes["req-s-2"]] == [("MeasureStream", "OK")]
    assert [(m, s) for m, s, _ in outcomes["(stream)"]] == [("MeasureStream", "OK")]
    model_lines = [o for rid, o in outcomes.items() if rid not in ("-",) and
                   o[0][0] == "MeasureModel"]
    assert [(m, s) for m, s, _ in model_lines[0]] == [("MeasureModel", "INVALID_ARGUMENT")]
    assert all(t >= 0 for o in outcomes.values() for _, _, t in o)
    # A measured request also says how long it waited for the device and held it.
    ok_line = next(line for line in daemon_log.splitlines() if "request req-ok-1 OK" in line)
    assert re.search(r"\(queued \d+\.\d{3} s, device \d+\.\d{3} s\) from ipv4:127\.0\.0\.1",
                     ok_line)
    # The refused token is one line, without the token presented.
    assert sum("refused /netadapt.v1.DeviceService/Measure: wrong token" in line
               for line in daemon_log.splitlines()) == 1


def test_a_client_chosen_id_cannot_forge_a_line(daemon_log: str) -> None:
    lines = daemon_log.splitlines()
    assert not any(line.startswith("2099-01-01") for line in lines)
    (forged,) = [line for line in lines if "request evil" in line]
    assert " OK in " in forged
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ \S+: ", line) or
               line.startswith("  ") for line in lines if line.strip()), \
        "every line is a record or an indented continuation"
