"""The daemon serves only what it was sent: a model that names a file on the device (external
weights anywhere in the format, an EPContext node) is refused with INVALID_ARGUMENT before it is
stored or loaded, and so are provider options that name paths and model references that are not
SHA-256 digests. The token a deployed daemon keeps in its working directory cannot be read
through an uploaded model: proved against a real daemon started in a folder holding `token`."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest

from device_server.server import RunningServer
from device_server.spec import GraphOptimization, LayerSpec, SessionSpec
from host.cli.netadapt_bench import main as bench_main
from host.device.client import DeviceClient, DeviceError
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY
from tests.helpers_hostile import HOSTILE_MODELS, NAMED, TOKEN_BYTES, external_initializer_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef"  # 16 bytes: exactly the four float32 the hostile models read
assert len(TOKEN) == TOKEN_BYTES
LINEAR = LayerSpec.create("linear", (1, 8), out_channels=8)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture()
def deployed(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A daemon started the way a deploy starts it: in its own folder, which holds its token
    (and its log)."""
    (tmp_path / "token").write_text(TOKEN)
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_server", "serve", "--port", "0", "--port-file", "port",
         "--token-file", "token"],
        cwd=tmp_path, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "port").exists():
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        yield f"127.0.0.1:{(tmp_path / 'port').read_text().strip()}", tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_token_cannot_be_read_through_an_uploaded_model(deployed: tuple[str, Path]) -> None:
    address, folder = deployed
    blob = external_initializer_model("token").SerializeToString()
    # The attack is real: ONNX Runtime, run where the daemon runs, loads the token as weights
    # (y = x + w with x = 0 gives w, the token's bytes).
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, numpy as np, onnxruntime as ort\n"
         "o = ort.SessionOptions()\n"
         "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n"
         "s = ort.InferenceSession(sys.stdin.buffer.read(), o)\n"
         "sys.stdout.buffer.write(s.run(None, {'x': np.zeros(4, np.float32)})[0].tobytes())\n"],
        input=blob, capture_output=True, cwd=folder, env=_env(), timeout=120)
    assert probe.returncode == 0, probe.stderr.decode()
    assert probe.stdout == TOKEN.encode()
    # The daemon refuses it, naming the tensor and how to embed the weights.
    session = SessionSpec(graph_optimization=GraphOptimization.DISABLE_ALL)
    with DeviceClient(address, token=TOKEN, retries=0) as client:
        with pytest.raises(DeviceError) as refused:
            client.measure_model(blob, session, FAST_POLICY)
        assert refused.value.code == "INVALID_ARGUMENT"
        message = refused.value.message
        assert "'w'" in message and "external_data" in message and "'token'" in message
        assert "save_as_external_data=False" in message
        assert TOKEN not in message
        # Nothing was stored: it cannot be measured by reference either.
        sha = hashlib.sha256(blob).hexdigest()
        assert not client.has_model(sha)
        with pytest.raises(DeviceError) as missing:
            client.measure_model(sha, session, FAST_POLICY)
        assert missing.value.code == "NOT_FOUND"
        assert client.measure(LINEAR, policy=FAST_POLICY).timing.median_ms > 0  # still serving
    assert TOKEN not in (folder / "daemon.log").read_text()


@pytest.mark.parametrize("name", sorted(HOSTILE_MODELS))
def test_every_kind_of_file_reference_is_refused_before_storing(daemon: RunningServer,
                                                                name: str) -> None:
    blob = HOSTILE_MODELS[name]().SerializeToString()
    with DeviceClient(daemon.address, retries=0) as client:
        with pytest.raises(DeviceError) as refused:
            client.upload_model(blob)
        assert refused.value.code == "INVALID_ARGUMENT"
        assert NAMED[name] in refused.value.message, refused.value.message
        assert "at " in refused.value.message  # where in the model it sits
        assert not client.has_model(hashlib.sha256(blob).hexdigest())


@pytest.mark.parametrize("options", [
    {"trt_engine_cache_path": "/tmp"},
    {"backend_path": "libQnnHtp.so"},
    {"cache_dir": "token"},
    {"some_option": "../token"},
    {"model": "/etc/passwd"},
])
def test_provider_options_naming_files_are_refused(stub: pb_grpc.DeviceServiceStub,
                                                   options: dict[str, str]) -> None:
    from device_server import wire

    request = pb.MeasureRequest(
        request_id="p", layer=wire.layer_to_proto(LINEAR),
        session=pb.SessionOptions(provider_options=options),
        policy=wire.policy_to_proto(FAST_POLICY))
    with pytest.raises(grpc.RpcError) as refused:
        stub.Measure(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(options)) in (refused.value.details() or "")
    with pytest.raises(grpc.RpcError) as overhead:
        stub.MeasureOverhead(pb.MeasureOverheadRequest(
            session=pb.SessionOptions(provider_options=options)), timeout=30)
    assert overhead.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("sha", ["../token", "token", "", "z" * 64, "a" * 63, "a" * 65])
def test_model_references_must_be_digests(stub: pb_grpc.DeviceServiceStub, sha: str) -> None:
    for call in (lambda: stub.HasModel(pb.ModelRef(sha256=sha), timeout=10),
                 lambda: stub.MeasureModel(pb.MeasureModelRequest(sha256=sha), timeout=10)):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "64 hex digits" in (refused.value.details() or "")
    chunk = pb.ModelChunk(sha256=sha, total_bytes=10, data=b"0123456789")
    with pytest.raises(grpc.RpcError) as upload:
        stub.UploadModel(iter([chunk]), timeout=10)
    assert upload.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bench_refuses_a_model_with_external_weights_before_connecting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")])
    model = onnx.helper.make_model(graph)
    path = tmp_path / "split.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="split.weights",
                    size_threshold=0)
    assert (tmp_path / "split.weights").exists()
    # An unreachable device: the refusal comes before any connection.
    code = bench_main(["--device", "127.0.0.1:1", "model", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'w'" in err and "save_as_external_data=False" in err


def test_a_node_unit_naming_a_file_is_refused(daemon: RunningServer) -> None:
    """NODE units carry any op type and attributes: an EPContext node pointing at `token`."""
    from device_server.spec import NodeOperand

    spec = LayerSpec.node("EPContext", [NodeOperand.input((1, 4))], [(1, 4)],
                          {"embed_mode": 0, "ep_cache_context": "token"})
    with DeviceClient(daemon.address, retries=0) as client:
        with pytest.raises(DeviceError) as refused:
            client.measure(spec, policy=FAST_POLICY)
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "EPContext" in refused.value.message
