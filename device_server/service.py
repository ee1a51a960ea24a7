"""The gRPC servicer: unpacks requests, calls the plain `Measurer`, packs replies.

Domain errors become statuses in one place (`_served`), each a `google.rpc.Status` (its code and
message are the call's; grpcio-status adds it as the call's details); a failing item of a
MeasureStream is answered in-band with the same Status (its `status` set) and the stream goes
on. Every request's outcome is one log
line: the method, the request id (cleaned of anything that could forge a line), the status,
the time it took (and for a measurement, the time it waited for the device and held it), and
the peer. Metadata, and so the token, is never logged.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_status import rpc_status

from device_server import wire
from device_server.device_info import DeviceIdentity
from device_server.device_state import read_state
from device_server.errors import MeasurementError
from device_server.measurer import Measurer, Timed
from device_server.model_store import parse_sha256
from device_server.queue import Cancelled
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc

__all__ = ["DeviceService", "safe_id"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


_UNSAFE = re.compile(r"[^A-Za-z0-9._:@/+=-]")


def safe_id(text: str, limit: int = 64) -> str:
    """A client-chosen id as it may appear in a log line: printable, no spaces, bounded."""
    cleaned = _UNSAFE.sub("?", text[:limit])
    return (cleaned + ("…" if len(text) > limit else "")) or "-"


def _log_outcome(method: str, request_id: str, status: str, t0: float,
                 context: grpc.ServicerContext, timed: Timed | None = None,
                 detail: str = "", ours: bool = False) -> None:
    """One line for one request's outcome; `ours`: the id is the daemon's, not a client's."""
    spent = time.monotonic() - t0
    held = ""
    if timed is not None:
        device_s = (timed.finished_unix_ns - timed.started_unix_ns) / 1e9
        held = f" (queued {timed.queued_s:.3f} s, device {device_s:.3f} s)"
    level = logging.INFO if status in ("OK", "CANCELLED", "INVALID_ARGUMENT", "NOT_FOUND",
                                       "DEADLINE_EXCEEDED", "FAILED_PRECONDITION",
                                       "RESOURCE_EXHAUSTED") else logging.WARNING
    log.log(level, "%s request %s %s in %.3f s%s from %s%s", method,
            request_id if ours else safe_id(request_id),
            status, spent, held, context.peer(), f": {detail}" if detail else "")


def _abort(context: grpc.ServicerContext, code: str, message: str) -> NoReturn:
    """Ends the call with `code` (a status code name) and `message`, as a google.rpc.Status."""
    context.abort_with_status(rpc_status.to_status(wire.error_status(code, message)))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _request_id(request: Any) -> str:
    return str(getattr(request, "request_id", "") or getattr(request, "sha256", "") or "-")


def _served(method: F) -> F:
    """Maps domain errors to gRPC statuses with their messages (internals hidden otherwise),
    and logs the outcome of the call in one line."""

    @functools.wraps(method)
    def wrapper(self: DeviceService, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.monotonic()
        name = method.__name__
        rid = _request_id(request)
        if self.closing:
            _log_outcome(name, rid, "UNAVAILABLE", t0, context, detail="shutting down")
            _abort(context, "UNAVAILABLE", "the daemon is shutting down")
        try:
            reply = method(self, request, context)
        except MeasurementError as exc:
            _log_outcome(name, rid, exc.code, t0, context, detail=str(exc))
            _abort(context, exc.code, str(exc))
        except Cancelled as exc:
            _log_outcome(name, rid, "CANCELLED", t0, context,
                         detail=str(exc) or "the call ended while queued")
            _abort(context, "CANCELLED", str(exc) or "the call was cancelled")
        except Exception as exc:
            log.exception("unexpected failure in %s request %s", name, safe_id(rid))
            _log_outcome(name, rid, "INTERNAL", t0, context, detail=type(exc).__name__)
            _abort(context, "INTERNAL", f"internal error: {type(exc).__name__}: {exc}")
        timed = None
        if isinstance(reply, tuple):  # (reply, Timed) from a measurement
            reply, timed = reply
        _log_outcome(name, _request_id(reply) if rid == "-" else rid, "OK", t0, context, timed)
        return reply

    return wrapper  # type: ignore[return-value]


class DeviceService(pb_grpc.DeviceServiceServicer):
    def __init__(self, measurer: Measurer, identity: DeviceIdentity) -> None:
        self.measurer = measurer
        self.identity = identity
        self.closing = False

    @_served
    def GetDeviceInfo(
        self, request: pb.GetDeviceInfoRequest, context: grpc.ServicerContext
    ) -> pb.DeviceInfo:
        return wire.device_info_to_proto(
            self.identity,
            queue_depth=self.measurer.queue.depth,
            max_queue_depth=self.measurer.queue.max_depth,
            default_threads=self.measurer.default_threads,
            state=read_state(),
        )

    def _measure_one(
        self, request: pb.MeasureRequest, context: grpc.ServicerContext
    ) -> tuple[pb.MeasureResponse, Timed]:
        timed = self.measurer.measure_layer(
            wire.layer_from_proto(request.layer),
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return wire.measure_response(request.request_id, timed), timed

    @_served
    def Measure(
        self, request: pb.MeasureRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        return self._measure_one(request, context)  # type: ignore[return-value]

    def MeasureStream(
        self, request_iterator: Iterator[pb.MeasureRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.MeasureResponse]:
        t0 = time.monotonic()
        answered = failed = 0
        status = "OK"
        try:
            for request in request_iterator:
                if self.closing:
                    status = "UNAVAILABLE"
                    _abort(context, "UNAVAILABLE", "the daemon is shutting down")
                if not context.is_active():
                    status = "CANCELLED"
                    return
                item_t0 = time.monotonic()
                rid = request.request_id
                try:
                    reply, timed = self._measure_one(request, context)
                except MeasurementError as exc:
                    _log_outcome("MeasureStream", rid, exc.code, item_t0, context,
                                 detail=str(exc))
                    failed += 1
                    yield wire.failed_response(rid, exc.code, str(exc))
                    continue
                except Cancelled as exc:
                    _log_outcome("MeasureStream", rid, "CANCELLED", item_t0, context,
                                 detail=str(exc) or "the stream ended while queued")
                    status = "CANCELLED"
                    return
                except Exception as exc:
                    log.exception("unexpected failure measuring %s", safe_id(rid))
                    _log_outcome("MeasureStream", rid, "INTERNAL", item_t0, context,
                                 detail=type(exc).__name__)
                    failed += 1
                    yield wire.failed_response(rid, "INTERNAL", f"{type(exc).__name__}: {exc}")
                    continue
                _log_outcome("MeasureStream", rid, "OK", item_t0, context, timed)
                answered += 1
                yield reply
        finally:
            if status == "OK" and not context.is_active():
                status = "CANCELLED"
            _log_outcome("MeasureStream", "(stream)", status, t0, context,
                         detail=f"{answered} measured, {failed} failed", ours=True)

    @_served
    def MeasureOverhead(
        self, request: pb.MeasureOverheadRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        timed = self.measurer.measure_overhead(
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return wire.measure_response("overhead", timed), timed  # type: ignore[return-value]

    @_served
    def UploadModel(
        self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext
    ) -> pb.UploadModelResponse:
        chunks = ((c.sha256, c.total_bytes, c.data) for c in request_iterator)
        sha, size = self.measurer.models.receive(chunks)
        return pb.UploadModelResponse(sha256=sha, size_bytes=size)

    @_served
    def HasModel(self, request: pb.ModelRef, context: grpc.ServicerContext) -> pb.HasModelResponse:
        sha = parse_sha256(request.sha256)
        return pb.HasModelResponse(present=sha in self.measurer.models)

    @_served
    def MeasureModel(
        self, request: pb.MeasureModelRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        sha = parse_sha256(request.sha256)
        timed = self.measurer.measure_model(
            sha,
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            input_shapes=wire.input_shapes_from_proto(request.input_shapes),
            input_feeds=wire.feeds_from_proto(request.inputs),
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return wire.measure_response(request.request_id, timed), timed  # type: ignore[return-value]
