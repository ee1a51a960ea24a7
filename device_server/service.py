"""The gRPC servicer: unpacks requests, calls the plain `Measurer`, packs replies.

Domain errors become statuses in one place (`_status_errors`); a failing item of a
MeasureStream is answered in-band (its `error` set) and the stream goes on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from device_server import wire
from device_server.device_info import DeviceIdentity, read_state
from device_server.errors import MeasurementError
from device_server.measurer import Measurer, Timed
from device_server.queue import Cancelled
from protos import device_pb2 as pb
from protos import device_pb2_grpc as pb_grpc

__all__ = ["DeviceService"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _status_errors(method: F) -> F:
    """Maps domain errors to gRPC statuses with their messages; hides internals otherwise."""

    @functools.wraps(method)
    def wrapper(self: DeviceService, request: Any, context: grpc.ServicerContext) -> Any:
        if self.closing:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
        try:
            return method(self, request, context)
        except MeasurementError as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))
        except Cancelled:
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled while queued")
        except Exception as exc:
            log.exception("unexpected failure in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]


def _response(request_id: str, timed: Timed) -> pb.MeasureResponse:
    return pb.MeasureResponse(
        request_id=request_id,
        config_hash=timed.config_hash,
        timing=wire.timing_to_proto(timed.timing),
        conditions=wire.conditions_to_proto(timed.conditions),
        started_unix_ns=timed.started_unix_ns,
        finished_unix_ns=timed.finished_unix_ns,
        device_state=timed.state,
    )


class DeviceService(pb_grpc.DeviceServiceServicer):
    def __init__(self, measurer: Measurer, identity: DeviceIdentity) -> None:
        self.measurer = measurer
        self.identity = identity
        self.closing = False

    @_status_errors
    def GetDeviceInfo(
        self, request: pb.GetDeviceInfoRequest, context: grpc.ServicerContext
    ) -> pb.DeviceInfo:
        ident = self.identity
        return pb.DeviceInfo(
            fingerprint=ident.fingerprint,
            cpu_model=ident.cpu_model,
            cpu_count=ident.cpu_count,
            machine=ident.machine,
            os=ident.os,
            os_release=ident.os_release,
            android_version=ident.android_version,
            ort_version=ident.ort_version,
            providers=list(ident.providers),
            daemon_version=ident.daemon_version,
            python_version=ident.python_version,
            queue_depth=self.measurer.queue.depth,
            max_queue_depth=self.measurer.queue.max_depth,
            default_threads=self.measurer.default_threads,
            state=read_state(),
            **ident.info_fields(),
        )

    def _measure_one(
        self, request: pb.MeasureRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        timed = self.measurer.measure_layer(
            wire.layer_from_proto(request.layer),
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return _response(request.request_id, timed)

    @_status_errors
    def Measure(
        self, request: pb.MeasureRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        return self._measure_one(request, context)

    def MeasureStream(
        self, request_iterator: Iterator[pb.MeasureRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.MeasureResponse]:
        for request in request_iterator:
            if self.closing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the daemon is shutting down")
            if not context.is_active():
                return
            try:
                yield self._measure_one(request, context)
            except MeasurementError as exc:
                yield pb.MeasureResponse(
                    request_id=request.request_id,
                    error=pb.Error(code=exc.code, message=str(exc)),
                )
            except Cancelled:
                return
            except Exception as exc:
                log.exception("unexpected failure measuring %s", request.request_id)
                yield pb.MeasureResponse(
                    request_id=request.request_id,
                    error=pb.Error(code="INTERNAL", message=f"{type(exc).__name__}: {exc}"),
                )

    @_status_errors
    def MeasureOverhead(
        self, request: pb.MeasureOverheadRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        timed = self.measurer.measure_overhead(
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return _response("overhead", timed)

    @_status_errors
    def UploadModel(
        self, request_iterator: Iterator[pb.ModelChunk], context: grpc.ServicerContext
    ) -> pb.UploadModelResponse:
        chunks = ((c.sha256, c.total_bytes, c.data) for c in request_iterator)
        sha, size = self.measurer.models.receive(chunks)
        log.info("stored model %s (%d bytes)", sha[:16], size)
        return pb.UploadModelResponse(sha256=sha, size_bytes=size)

    @_status_errors
    def HasModel(self, request: pb.ModelRef, context: grpc.ServicerContext) -> pb.HasModelResponse:
        return pb.HasModelResponse(present=request.sha256.lower() in self.measurer.models)

    @_status_errors
    def MeasureModel(
        self, request: pb.MeasureModelRequest, context: grpc.ServicerContext
    ) -> pb.MeasureResponse:
        shapes = {name: tuple(s.dims) for name, s in request.input_shapes.items()}
        timed = self.measurer.measure_model(
            request.sha256.lower(),
            wire.session_from_proto(request.session),
            wire.policy_from_proto(request.policy),
            input_shapes=shapes,
            deadline=_deadline(context),
            is_active=context.is_active,
        )
        return _response(request.request_id, timed)
