"""Creating, running and stopping the daemon's gRPC server.

`create_server` builds a started server and returns its port; `running_server` is the context
manager tests and the host's embedded daemon use; `serve` blocks until SIGTERM/SIGINT, turning
health NOT_SERVING before a graceful stop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from device_server.auth import TokenAuthInterceptor
from device_server.device_info import DeviceIdentity, probe_identity
from device_server.measurer import Limits, Measurer
from device_server.service import DeviceService
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc

__all__ = ["ServerConfig", "RunningServer", "create_server", "running_server", "serve",
           "InsecureBindError", "SERVICE_NAME", "is_loopback"]

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeviceService"].full_name
_MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # model chunks are <= 1 MiB; leave room for big batches


class InsecureBindError(ValueError):
    """Serving beyond loopback without a token or TLS, and without an explicit --insecure."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0                      # 0: any free port
    token: str | None = None
    tls_cert: str | None = None        # PEM file paths
    tls_key: str | None = None
    insecure: bool = False             # allow a non-loopback bind with neither token nor TLS
    threads: int = 1                   # default ORT intra-op threads for measurements
    limits: Limits = field(default_factory=Limits)
    grace_s: float = 5.0


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    host: str
    service: DeviceService
    health: health.HealthServicer

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        """Health NOT_SERVING first, new calls refused, then in-flight calls get `grace_s`."""
        self.service.closing = True
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()
        self.service.measurer.close()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _add_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def _add_reflection(server: grpc.Server) -> None:
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


def create_server(config: ServerConfig) -> RunningServer:
    """Builds, binds and starts the daemon.

    Raises:
        InsecureBindError: a non-loopback host without token/TLS/--insecure.
        ValueError: TLS files given by halves, or the port cannot be bound.
    """
    secured = bool(config.token) or bool(config.tls_cert)
    if not is_loopback(config.host) and not secured and not config.insecure:
        raise InsecureBindError(
            f"serving on {config.host} exposes the device to the network: pass --token-file "
            f"or --tls-cert/--tls-key, or --insecure if the network is trusted"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    identity = probe_identity()
    measurer = Measurer(identity.fingerprint, config.threads, config.limits,
                        pinned_cpus=identity.confined_to)
    try:
        return _start(config, identity, measurer)
    except BaseException:
        measurer.close()
        raise


def _start(config: ServerConfig, identity: DeviceIdentity, measurer: Measurer) -> RunningServer:
    service = DeviceService(measurer, identity)
    interceptors = [TokenAuthInterceptor(config.token)] if config.token else []
    # Requests beyond the queue cap are refused by the queue itself; the pool just needs to
    # hold every call that may be waiting.
    workers = config.limits.max_queue_depth + 8
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="netadapt-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            # A second daemon on a taken port must fail, not share it (gRPC's default on Linux).
            ("grpc.so_reuseport", 0),
            # A client that vanished without closing its connection (phone off Wi-Fi, laptop
            # asleep) is noticed within ~30 s, and its measurement abandoned like a cancel.
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
        ],
        maximum_concurrent_rpcs=workers,
    )
    pb_grpc.add_DeviceServiceServicer_to_server(service, server)
    health_servicer = _add_health(server)
    _add_reflection(server)
    host = f"[{config.host}]" if ":" in config.host else config.host
    bind = f"{host}:{config.port}"
    if config.tls_cert and config.tls_key:
        with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(bind, creds)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise ValueError(f"cannot bind {bind}: is the port in use?")
    server.start()
    log.info("netadapt daemon %s serving on %s (fingerprint %s, ORT %s, providers %s)",
             identity.daemon_version, bind.rsplit(":", 1)[0] + f":{port}", identity.fingerprint,
             identity.ort_version, ",".join(identity.providers))
    return RunningServer(server, port, config.host, service, health_servicer)


@contextmanager
def running_server(config: ServerConfig | None = None) -> Iterator[RunningServer]:
    """A started daemon for the body of the `with`, stopped with a grace period after."""
    running = create_server(config or ServerConfig())
    try:
        yield running
    finally:
        running.stop(grace_s=(config or ServerConfig()).grace_s)


def serve(config: ServerConfig, port_file: str | None = None,
          parent_pid: int | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully.

    With `parent_pid`, also stops once this process's parent is no longer that process (the
    host that started a loopback daemon was killed: nothing else would stop it).
    """
    running = create_server(config)
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{running.port}\n")
        os.replace(tmp, port_file)  # readers never see a half-written file
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(timeout=1.0):
        if parent_pid is not None and os.getppid() != parent_pid:
            log.info("parent process %d is gone: shutting down", parent_pid)
            break
    running.stop(grace_s=config.grace_s)
    log.info("stopped")
