"""The daemon as its own process: it runs without torch, and SIGTERM stops it gracefully even
with a stream open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from device_server import wire
from device_server.spec import LayerSpec
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc
from tests.conftest import FAST_POLICY
from tests.helpers_process import kill_host_and_find_survivors

ROOT = Path(__file__).resolve().parents[1]

# Any attempt to import torch fails loudly, as it would on a phone without it.
NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not allowed on the device side")
    sys.meta_path.insert(0, _Block())
    """
)


def _start_daemon(tmp_path: Path, prelude: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port_file = tmp_path / "port"
    code = prelude + textwrap.dedent(
        f"""
        import sys
        from device_server.cli import main
        sys.exit(main(["serve", "--port", "0", "--port-file", {str(port_file)!r},
                       "--log-level", "WARNING"]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("daemon did not start within 60 s")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def test_device_side_runs_without_torch(tmp_path: Path) -> None:
    proc, address = _start_daemon(tmp_path, prelude=NO_TORCH)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.DeviceServiceStub(channel)
            spec = LayerSpec.create("conv2d", (1, 16, 14, 14), out_channels=32, kernel=3, padding=1)
            reply = stub.Measure(pb.MeasureRequest(layer=wire.layer_to_proto(spec),
                                                   policy=wire.policy_to_proto(FAST_POLICY)),
                                 timeout=60)
            assert reply.timing.median_ms > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_device_modules_do_not_import_torch() -> None:
    modules = sorted(
        f"device_server.{p.stem}" for p in (ROOT / "device_server").glob("*.py")
        if p.stem != "__main__"
    ) + ["protos.device_pb2", "protos.device_pb2_grpc"]
    code = NO_TORCH + "import importlib\n" + "".join(
        f"importlib.import_module({m!r})\n" for m in modules
    ) + "assert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_sigterm_with_an_open_stream_stops_gracefully(tmp_path: Path) -> None:
    proc, address = _start_daemon(tmp_path)
    spec = LayerSpec.create("conv2d", (1, 16, 14, 14), out_channels=16, kernel=3, padding=1,
                            groups=16)
    sent = []

    def requests() -> Iterator[pb.MeasureRequest]:
        for i in range(1000):  # far more than can run before the signal
            sent.append(i)
            yield pb.MeasureRequest(request_id=str(i), layer=wire.layer_to_proto(spec),
                                    policy=wire.policy_to_proto(FAST_POLICY))
            time.sleep(0.02)

    try:
        with grpc.insecure_channel(address) as channel:
            stream = pb_grpc.DeviceServiceStub(channel).MeasureStream(requests(), timeout=120)
            first = next(stream)
            assert first.request_id == "0"
            os.kill(proc.pid, signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as exc:
                for _ in stream:
                    pass
            assert exc.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_host_leaves_no_loopback_daemon_behind(tmp_path: Path) -> None:
    """SIGKILL gives the host no chance to stop its daemon: the daemon notices and stops."""
    pid_file = tmp_path / "pids"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from host.device.local_daemon import start_local_daemon
        d = start_local_daemon()
        worker = [int(p) for p in Path(f"/proc/{{d.process.pid}}/task/{{d.process.pid}}/children")
                  .read_text().split()]
        Path({str(pid_file)!r}).write_text(" ".join(map(str, [d.process.pid, *worker])))
        time.sleep(600)
        """
    )
    survivors = kill_host_and_find_survivors(code, pid_file, ROOT, "daemon", start_s=90)
    assert not survivors, f"still running: {survivors}"
