"""Daemon security: bearer tokens (constant-time, never logged), TLS, and refusing to serve
beyond loopback unprotected."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from device_server.server import InsecureBindError, ServerConfig, create_server, running_server
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc

TOKEN = "s3cret-token-for-tests"


def _info(stub: pb_grpc.DeviceServiceStub, token: str | None) -> pb.DeviceInfo:
    metadata = [("authorization", f"Bearer {token}")] if token is not None else None
    return stub.GetDeviceInfo(pb.GetDeviceInfoRequest(), timeout=5, metadata=metadata)


def test_token_required_when_configured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with running_server(ServerConfig(token=TOKEN, grace_s=0.5)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.DeviceServiceStub(channel)
            assert _info(stub, TOKEN).cpu_count >= 1
            for token, detail in ((None, "missing bearer token"), ("wrong", "invalid bearer")):
                with pytest.raises(grpc.RpcError) as exc:
                    _info(stub, token)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert detail in exc.value.details()
            # A streaming method is refused the same way.
            with pytest.raises(grpc.RpcError) as exc:
                list(stub.MeasureStream(iter([pb.MeasureRequest()]), timeout=5))
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # Health answers probes without credentials.
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert TOKEN not in caplog.text and "wrong" not in caplog.text.replace("wrong token", "")


def test_no_token_needed_on_loopback_by_default(daemon: object, stub: pb_grpc.DeviceServiceStub
                                                ) -> None:
    assert _info(stub, None).cpu_count >= 1


def test_non_loopback_bind_needs_token_tls_or_insecure() -> None:
    with pytest.raises(InsecureBindError, match="--token-file"):
        create_server(ServerConfig(host="0.0.0.0"))


def _tls_config(tmp_path: Path) -> tuple[ServerConfig, Path]:
    """A loopback daemon's TLS configuration with a fresh self-signed certificate, and the
    certificate (the client's root)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    config = ServerConfig(host="127.0.0.1", tls_cert=str(cert), tls_key=str(key), grace_s=0.5)
    return config, cert


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl command")


@needs_openssl
def test_tls_serves_and_plaintext_clients_fail(tmp_path: Path) -> None:
    config, cert = _tls_config(tmp_path)
    with running_server(config) as server:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(server.address, creds) as channel:
            assert _info(pb_grpc.DeviceServiceStub(channel), None).cpu_count >= 1
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as exc:
                _info(pb_grpc.DeviceServiceStub(channel), None)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE


@needs_openssl
def test_adapt_reaches_a_tls_daemon_with_its_root_certificate(tmp_path: Path) -> None:
    """`netadapt-host adapt --tls-root-cert` connects over TLS: it gets far enough to read the
    device's identity (and refuse a table of another device); without the certificate it stops
    in one line, before any training or output."""
    import io

    from host.cli.netadapt_host import main as host_main
    from tests.helpers_engine import tiny_checkpoint_and_foreign_table

    config, cert = _tls_config(tmp_path)
    ckpt, table = tiny_checkpoint_and_foreign_table(tmp_path)
    with running_server(config) as server:
        base = ["adapt", "--model", "tiny_cnn", "--data", "digits", "--checkpoint", str(ckpt),
                "--device", server.address, "--workdir", str(tmp_path / "run"),
                "--lut", str(table)]
        err = io.StringIO()
        code = host_main([*base, "--tls-root-cert", str(cert)], out=io.StringIO(), err=err)
        assert code == 1 and "device_fingerprint" in err.getvalue(), err.getvalue()
        err = io.StringIO()
        code = host_main(base, out=io.StringIO(), err=err)
        assert code == 1 and server.address in err.getvalue(), err.getvalue()
        assert err.getvalue().count("\n") == 1
    assert not (tmp_path / "run").exists()
