"""Host-side client of the netadapt measurement daemon (`netadapt.v1.DeviceService`).

`DeviceClient` holds one channel and one stub. Every call carries an explicit deadline; calls
that fail with UNAVAILABLE (daemon not up yet, connection dropped) are retried a bounded number
of times with exponential backoff, and every other failure is raised as `DeviceError` with the
status code name and the daemon's message. Results come back as dataclasses (`Measurement`,
`MeasureFailure`, `DeviceInfo`, `TimingStats`: host/device/results.py), never as protobuf
messages; every conversion is in host/device/wire.py.

A stream of measurements (`measure_many`) survives a dropped connection: items the daemon has
not answered yet are sent again on a new stream, so each item is answered exactly once.

Imports neither torch nor onnx: standalone benchmarking needs only grpcio and protobuf.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from device_server import wire as shared
from device_server.inputs import InputFeed
from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from device_server.stats import TimingStats
from host.device import wire
from host.device.results import (
    DeviceError,
    DeviceInfo,
    MeasureFailure,
    Measurement,
    MeasureResult,
)
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc

__all__ = [
    "DeviceClient",
    "DeviceError",
    "DeviceInfo",
    "Measurement",
    "MeasureFailure",
    "MeasureResult",
    "SERVICE_NAME",
    "MIN_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
]

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["DeviceService"].full_name
MIN_CHUNK_BYTES = 64 * 1024  # the daemon's contract: upload chunks of 64 KiB ..
MAX_CHUNK_BYTES = 1024 * 1024  # .. 1 MiB (the last chunk may be smaller)
_MAX_BACKOFF_S = 4.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Reconnect quickly after the daemon comes up, rather than gRPC's default 1 s .. 120 s backoff.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

T = TypeVar("T")


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_bytes(value: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


class DeviceClient:
    """Client of one measurement daemon.

    Args:
        address: "host:port" of the daemon.
        token: bearer token the daemon was started with (sent as `authorization` metadata).
        tls_root_cert: PEM root certificate (path or bytes) to verify a TLS daemon; None for a
            plaintext channel (loopback, or a USB/adb-forwarded port).
        timeout_s: deadline of each call unless the call is given its own.
        retries: how many times a call failing with UNAVAILABLE is tried again (so at most
            `retries + 1` attempts), waiting `backoff_s`, then twice that, and so on.
        backoff_s: first wait between attempts.

    Usable from several threads (gRPC channels are thread-safe). Use as a context manager, or
    call `close()`.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_root_cert: str | os.PathLike[str] | bytes | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.25,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._has_token = token is not None
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token is not None else ()
        )
        if tls_root_cert is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=_read_bytes(tls_root_cert))
            self._channel = grpc.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        else:
            if token is not None and not _is_loopback(address):
                logger.warning(
                    "sending the token to %s over a plaintext channel; pass tls_root_cert to "
                    "encrypt it",
                    address,
                )
            self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.DeviceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceClient({self.address!r}, timeout_s={self.timeout_s}, retries={self.retries})"

    def wait_ready(self, timeout_s: float = 30.0, service: str = SERVICE_NAME) -> None:
        """Blocks until the daemon's health service reports SERVING.

        Checks `service` (falling back to the whole server, "", if the daemon does not report
        that service by name).

        Raises:
            DeviceError: UNAVAILABLE when the daemon is not SERVING within `timeout_s`;
                UNAUTHENTICATED and other errors at once.
        """
        deadline = time.monotonic() + timeout_s
        delay = min(self.backoff_s, 0.1)
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceError(
                    "UNAVAILABLE",
                    f"the device daemon at {self.address} was not ready within {timeout_s:g} s "
                    f"({last}); check that the daemon is running there",
                    self.address,
                )
            try:
                reply = self._health.Check(
                    health_pb2.HealthCheckRequest(service=service),
                    timeout=min(remaining, 5.0),
                    metadata=self._metadata,
                )
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health status {status}"
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND and service:
                    service = ""  # the daemon reports health for the server as a whole only
                    continue
                if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise self._error("Health.Check", exc, None) from None
                last = exc.details() or code.name
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)

    # -- queries ---------------------------------------------------------------------------
    def device_info(self, timeout_s: float | None = None) -> DeviceInfo:
        reply = self._unary(
            "GetDeviceInfo", self._stub.GetDeviceInfo, pb.GetDeviceInfoRequest(), timeout_s
        )
        return wire.device_info_from_proto(reply)

    # -- measurements ----------------------------------------------------------------------
    def measure(
        self,
        spec: LayerSpec,
        session: SessionSpec | None = None,
        policy: MeasurePolicy | None = None,
        timeout_s: float | None = None,
    ) -> Measurement:
        """Times one layer.

        Raises:
            DeviceError: the daemon refused or failed the measurement (INVALID_ARGUMENT,
                FAILED_PRECONDITION, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...).
        """
        request = wire.measure_request(
            _new_request_id(),
            shared.layer_to_proto(spec),
            shared.session_to_proto(session or SessionSpec()),
            shared.policy_to_proto(policy or MeasurePolicy()),
        )
        reply = self._unary("Measure", self._stub.Measure, request, timeout_s)
        return wire.measurement_from_proto(reply, spec, request.request_id)

    def measure_many(
        self,
        specs: Iterable[LayerSpec],
        session: SessionSpec | None = None,
        policy: MeasurePolicy | None = None,
        on_result: Callable[[MeasureResult], None] | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[MeasureResult]:
        """Times many layers over one stream; yields each result as the daemon answers it.

        Each result carries its `request_id`, `spec` and `index` (its position in `specs`: the
        daemon answers in the order it measured, not the order given); a layer the daemon could
        not measure yields a `MeasureFailure` and the others go on. `on_result` (if given) is
        called with each result before it is yielded (e.g. to advance a progress bar or store a
        row).

        `timeout_s` bounds the whole stream; by default the client's per-call timeout times
        the number of layers. If the connection drops (UNAVAILABLE), the layers not answered
        yet are sent again on a new stream, up to `retries` times in a row without progress.

        Raises:
            DeviceError: the stream as a whole failed (unreachable daemon, UNAUTHENTICATED,
                deadline passed). Results yielded before stay valid.
        """
        items = list(specs)
        prefix = uuid.uuid4().hex[:12]
        # Converted up front, so a bad spec fails here rather than inside gRPC's sender thread.
        pending = {
            f"{prefix}-{i}": (spec, shared.layer_to_proto(spec)) for i, spec in enumerate(items)
        }
        total_s = timeout_s if timeout_s is not None else self.timeout_s * max(1, len(items))
        return self._measure_stream(
            pending,
            shared.session_to_proto(session or SessionSpec()),
            shared.policy_to_proto(policy or MeasurePolicy()),
            on_result,
            total_s,
            {rid: i for i, rid in enumerate(pending)},
        )

    def overhead(
        self,
        session: SessionSpec | None = None,
        policy: MeasurePolicy | None = None,
        timeout_s: float | None = None,
    ) -> TimingStats:
        """Per-call cost of a session run (an identity graph), to subtract when summing layers."""
        request = wire.overhead_request(session or SessionSpec(), policy or MeasurePolicy())
        reply = self._unary("MeasureOverhead", self._stub.MeasureOverhead, request, timeout_s)
        return wire.measurement_from_proto(reply, None, "overhead").timing

    # -- whole models ----------------------------------------------------------------------
    def has_model(self, sha256: str, timeout_s: float | None = None) -> bool:
        reply = self._unary(
            "HasModel", self._stub.HasModel, pb.ModelRef(sha256=sha256), timeout_s
        )
        return bool(reply.present)

    def upload_model(
        self,
        onnx_bytes: bytes,
        chunk_bytes: int = 256 * 1024,
        timeout_s: float | None = None,
    ) -> str:
        """Sends an ONNX model to the daemon (once: skipped if it holds it) and returns its
        SHA-256 hex digest, the reference `measure_model` takes.

        Raises:
            ValueError: `chunk_bytes` outside 64 KiB .. 1 MiB, or an empty model.
            DeviceError: the daemon refused the model (e.g. INVALID_ARGUMENT for bytes that are
                not ONNX, RESOURCE_EXHAUSTED for a model over its size cap).
        """
        if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(
                f"chunk_bytes must be within {MIN_CHUNK_BYTES} .. {MAX_CHUNK_BYTES}, "
                f"got {chunk_bytes}"
            )
        if not onnx_bytes:
            raise ValueError("the model is empty (0 bytes)")
        sha = hashlib.sha256(onnx_bytes).hexdigest()
        if self.has_model(sha, timeout_s):
            logger.info("model %s is already on %s; not sending it again", sha[:12], self.address)
            return sha

        def chunks() -> Iterator[pb.ModelChunk]:
            view = memoryview(onnx_bytes)
            for offset in range(0, len(onnx_bytes), chunk_bytes):
                data = bytes(view[offset : offset + chunk_bytes])
                if offset == 0:
                    yield pb.ModelChunk(sha256=sha, total_bytes=len(onnx_bytes), data=data)
                else:
                    yield pb.ModelChunk(data=data)

        timeout = self._timeout(timeout_s)
        t0 = time.perf_counter()
        reply = self._retrying(
            "UploadModel",
            lambda: self._stub.UploadModel(chunks(), timeout=timeout, metadata=self._metadata),
            timeout,
        )
        if reply.sha256 and reply.sha256 != sha:
            raise DeviceError(
                "DATA_LOSS", f"the daemon stored the model as {reply.sha256}, expected {sha}",
                self.address,
            )
        logger.info(
            "uploaded model %s (%d bytes) to %s in %.2f s",
            sha[:12],
            len(onnx_bytes),
            self.address,
            time.perf_counter() - t0,
        )
        return sha

    def measure_model(
        self,
        onnx_bytes_or_sha: bytes | str,
        session: SessionSpec | None = None,
        policy: MeasurePolicy | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        timeout_s: float | None = None,
        input_feeds: Mapping[str, InputFeed] | None = None,
    ) -> Measurement:
        """Times a whole ONNX model: given as bytes (uploaded first, if the daemon lacks it) or
        as the SHA-256 of a model uploaded before.

        `input_shapes` fixes inputs with symbolic dimensions (the daemon uses 1 for others).
        `input_feeds` gives inputs exact values or ranges to draw from (others: random, within
        what the model's graph can take where it tells).

        Raises:
            ValueError: a string that is not a SHA-256 hex digest.
            DeviceError: NOT_FOUND for an unknown digest; INVALID_ARGUMENT for a model the
                runtime cannot load; and the errors of `measure`.
        """
        if isinstance(onnx_bytes_or_sha, bytes | bytearray | memoryview):
            sha = self.upload_model(bytes(onnx_bytes_or_sha), timeout_s=timeout_s)
        else:
            sha = onnx_bytes_or_sha.strip().lower()
            if not _SHA256_RE.match(sha):
                raise ValueError(
                    f"expected model bytes or a SHA-256 hex digest (64 hex digits), got "
                    f"{onnx_bytes_or_sha!r}"
                )
        request = wire.model_request(_new_request_id(), sha, session or SessionSpec(),
                                     policy or MeasurePolicy(), input_shapes or {},
                                     input_feeds or {})
        reply = self._unary("MeasureModel", self._stub.MeasureModel, request, timeout_s)
        return wire.measurement_from_proto(reply, None, request.request_id, model_sha256=sha)

    # -- plumbing --------------------------------------------------------------------------
    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s

    def _unary(self, name: str, method: Any, request: Any, timeout_s: float | None) -> Any:
        timeout = self._timeout(timeout_s)
        return self._retrying(
            name, lambda: method(request, timeout=timeout, metadata=self._metadata), timeout
        )

    def _retrying(self, name: str, attempt: Callable[[], T], timeout: float | None) -> T:
        """Runs `attempt`, again after a backoff while it fails with UNAVAILABLE (bounded)."""
        delay = self.backoff_s
        for tries in range(self.retries + 1):
            try:
                return attempt()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or tries == self.retries:
                    raise self._error(name, exc, timeout, attempts=tries + 1) from None
                logger.info(
                    "%s to %s: UNAVAILABLE (%s); retry %d/%d in %.2f s",
                    name,
                    self.address,
                    exc.details(),
                    tries + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _MAX_BACKOFF_S)
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(
        self, name: str, exc: grpc.RpcError, timeout: float | None, attempts: int = 1
    ) -> DeviceError:
        """Turns a failed call into a DeviceError whose message says what to do about it."""
        code = exc.code()
        details = exc.details() or ""
        code_name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.UNAVAILABLE:
            tried = f" after {attempts} attempts" if attempts > 1 else ""
            message = (
                f"cannot reach the device daemon at {self.address}{tried} ({details}); check "
                f"that the daemon is running there (python -m device_server serve) and that "
                f"the address, port and TLS settings are right"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and details == "Deadline Exceeded":
            # The client's own deadline passed (the daemon's refusals carry their own message).
            message = (
                f"{name}: no answer from {self.address} within {timeout:g} s; give the call "
                f"more time or ask for fewer repeats"
                if timeout is not None
                else f"{name}: no answer from {self.address} in time"
            )
        elif code == grpc.StatusCode.UNAUTHENTICATED and not self._has_token:
            message = f"{details or 'not authenticated'} (no token was given; pass the daemon's)"
        else:
            message = details or f"{name} failed"
        return DeviceError(code_name, message, self.address)

    def _measure_stream(
        self,
        pending: dict[str, tuple[LayerSpec, pb.LayerConfig]],
        session: pb.SessionOptions,
        policy: pb.MeasurePolicy,
        on_result: Callable[[MeasureResult], None] | None,
        total_s: float,
        indices: dict[str, int] | None = None,
    ) -> Iterator[MeasureResult]:
        total = len(pending)
        index_of = indices or {}
        deadline = time.monotonic() + total_s
        failures_in_a_row = 0
        delay = self.backoff_s
        while pending:
            # What is not answered yet, in the order given.
            batch = [wire.measure_request(rid, layer, session, policy)
                     for rid, (_, layer) in pending.items()]

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeviceError(
                    "DEADLINE_EXCEEDED",
                    f"MeasureStream: {len(pending)} of {total} layers not measured by "
                    f"{self.address} within {total_s:g} s; give the stream more time",
                    self.address,
                )
            call = self._stub.MeasureStream(
                iter(batch), timeout=remaining, metadata=self._metadata
            )
            progressed = False
            try:
                for reply in call:
                    item = pending.pop(reply.request_id, None)
                    if item is None:
                        raise DeviceError(
                            "INTERNAL",
                            f"the daemon answered unknown request_id {reply.request_id!r}",
                            self.address,
                        )
                    progressed = True
                    result = wire.result_from_proto(reply, item[0],
                                                    index_of.get(reply.request_id, -1))
                    if on_result is not None:
                        on_result(result)
                    yield result
            except grpc.RpcError as exc:
                # Progress restarts the count: only attempts in a row that answer nothing add up.
                failures_in_a_row = 1 if progressed else failures_in_a_row + 1
                if progressed:
                    delay = self.backoff_s
                if exc.code() != grpc.StatusCode.UNAVAILABLE or failures_in_a_row > self.retries:
                    raise self._error(
                        "MeasureStream", exc, total_s, attempts=failures_in_a_row
                    ) from None
                logger.info(
                    "MeasureStream to %s: UNAVAILABLE (%s); sending the %d unanswered layers "
                    "again in %.2f s",
                    self.address,
                    exc.details(),
                    len(pending),
                    delay,
                )
                time.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, _MAX_BACKOFF_S)
                continue
            finally:
                call.cancel()  # no-op once the stream is done; stops it if the caller broke off
            if pending:
                raise DeviceError(
                    "INTERNAL",
                    f"the daemon closed the stream with {len(pending)} of {total} layers "
                    f"unanswered",
                    self.address,
                )


def _new_request_id() -> str:
    return uuid.uuid4().hex
