"""The daemon's plain core: turns a validated request into a timing. Knows nothing of gRPC.

Every measurement holds the device queue for its whole duration (session creation included),
so measurements never overlap. ONNX Runtime runs in a worker process (`worker.py`) that keeps
the sessions, LRU-cached by (graph, session options), and that a crash can take down alone.

A measurement whose caller stops waiting (`is_active()` turns false: the call was cancelled,
its deadline passed, its stream closed) is dropped from the queue if it has not started, and
interrupted in the worker if it has, so the device is free again within
`Limits.cancel_grace_s` (plus a worker restart in the rare case the interrupt is not enough).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import onnx
import onnxruntime as ort

from device_server.builder import build_identity_model, build_layer_model
from device_server.device_state import DeviceState, read_state
from device_server.errors import DeadlineError, ResourceLimitError, UnavailableProviderError
from device_server.inputs import InputFeed, feeds_key
from device_server.model_check import check_provider_options, check_self_contained
from device_server.model_store import ModelStore
from device_server.queue import Cancelled, DeviceQueue
from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from device_server.stats import Conditions, TimingStats
from device_server.worker import Job, JobCancelled, MeasureWorker

__all__ = ["Limits", "Measurer", "Timed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Caps that protect the device: refused requests are never attempted."""

    max_tensor_mib: float = 512.0     # inputs + weights + outputs of one unit, float32
    max_gmacs: float = 50.0           # multiply-accumulates of one unit, per call
    max_measure_s: float = 120.0      # one measurement, warm-up included
    max_queue_depth: int = 32
    max_model_mib: float = 512.0
    model_cache_mib: float = 1024.0
    session_cache_size: int = 64
    hang_grace_s: float = 30.0        # beyond a measurement's budget before its worker is killed
    cancel_grace_s: float = 1.0       # an abandoned measurement's time to stop before a kill


@dataclass(frozen=True, kw_only=True)
class Timed:
    """A timing with its conditions and the interval it held the device (daemon clock)."""

    timing: TimingStats
    conditions: Conditions
    started_unix_ns: int
    finished_unix_ns: int
    config_hash: str
    state: DeviceState = DeviceState()                    # device state as it ended
    queued_s: float = 0.0                                 # waiting for the device before


def _self_contained(model: onnx.ModelProto) -> onnx.ModelProto:
    """A unit the daemon built from a client's description (a NODE unit names any op type and
    attributes) is held to the rule uploaded models are: it names no file."""
    check_self_contained(model)
    return model


class Measurer:
    def __init__(self, fingerprint: str, default_threads: int, limits: Limits,
                 pinned_cpus: tuple[int, ...] = ()) -> None:
        self.fingerprint = fingerprint
        self.pinned_cpus = pinned_cpus  # part of every timing's conditions
        self.default_threads = default_threads
        self.limits = limits
        self.queue = DeviceQueue(limits.max_queue_depth)
        self.models = ModelStore(
            int(limits.max_model_mib * 2**20), int(limits.model_cache_mib * 2**20)
        )
        self.worker = MeasureWorker(limits.session_cache_size, limits.hang_grace_s,
                                    limits.cancel_grace_s)
        self.abandoned_queued = 0     # dropped before they got the device
        self.abandoned_running = 0    # stopped in the worker

    def close(self) -> None:
        """Stops the worker process."""
        self.worker.close()

    # -- public entry points -------------------------------------------------------------
    def measure_layer(
        self,
        spec: LayerSpec,
        session: SessionSpec,
        policy: MeasurePolicy,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
    ) -> Timed:
        self._check_layer_bounds(spec)
        return self._measure(
            ("layer", spec.key()),
            spec.digest(),
            lambda: _self_contained(build_layer_model(spec)).SerializeToString(),
            spec.describe(),
            session,
            policy,
            deadline,
            is_active,
        )

    def measure_overhead(
        self,
        session: SessionSpec,
        policy: MeasurePolicy,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
    ) -> Timed:
        return self._measure(
            ("identity",),
            "identity",
            lambda: build_identity_model().SerializeToString(),
            "the identity graph",
            session,
            policy,
            deadline,
            is_active,
        )

    def measure_model(
        self,
        sha256: str,
        session: SessionSpec,
        policy: MeasurePolicy,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
        input_feeds: dict[str, InputFeed] | None = None,
    ) -> Timed:
        blob = self.models.get(sha256)
        shapes = input_shapes or {}
        shape_key = ";".join(f"{k}={list(v)}" for k, v in sorted(shapes.items()))
        return self._measure(
            ("model", sha256, shape_key, feeds_key(input_feeds)),
            sha256[:16],
            lambda: blob,
            f"model {sha256[:16]}",
            session,
            policy,
            deadline,
            is_active,
            shapes,
            input_feeds,
        )

    # -- internals -----------------------------------------------------------------------
    def _check_layer_bounds(self, spec: LayerSpec) -> None:
        mib = spec.tensor_bytes() / 2**20
        if mib > self.limits.max_tensor_mib:
            raise ResourceLimitError(
                f"{spec.describe()} needs {mib:.0f} MiB of tensors, over this daemon's cap of "
                f"{self.limits.max_tensor_mib:.0f} MiB: use a smaller batch, size or channels"
            )
        gmacs = spec.macs() / 1e9
        if gmacs > self.limits.max_gmacs:
            raise ResourceLimitError(
                f"{spec.describe()} is {gmacs:.1f} GMACs per call, over this daemon's cap of "
                f"{self.limits.max_gmacs:.0f} GMACs: use a smaller batch, size or channels"
            )

    def _resolve_session(self, session: SessionSpec) -> SessionSpec:
        check_provider_options(session.provider_options)
        available = ort.get_available_providers()
        if session.provider not in available:
            raise UnavailableProviderError(
                f"execution provider {session.provider!r} is not available on this device; "
                f"available: {', '.join(available)}"
            )
        return session.with_threads(self.default_threads)

    def _measure(
        self,
        graph_key: tuple[str, ...],
        config_hash: str,
        model_bytes: Callable[[], bytes],
        what: str,
        session: SessionSpec,
        policy: MeasurePolicy,
        deadline: float | None,
        is_active: Callable[[], bool] | None,
        input_shapes: dict[str, tuple[int, ...]] | None = None,
        input_feeds: dict[str, InputFeed] | None = None,
    ) -> Timed:
        policy.validate()
        resolved = self._resolve_session(session)
        cache_key = (*graph_key, resolved.key())
        asked = time.monotonic()

        def stop() -> bool:
            return (is_active is not None and not is_active()) or (
                deadline is not None and time.monotonic() > deadline)

        holding = False
        try:
            with self.queue.hold(deadline=deadline, is_active=is_active):
                holding = True
                queued_s = time.monotonic() - asked
                started = time.time_ns()
                job = Job(cache_key, resolved, policy, self.limits.max_measure_s,
                          None if deadline is None else deadline - time.monotonic(),
                          input_shapes, input_feeds)
                timing = self.worker.measure(job, model_bytes, what, stop)
                finished = time.time_ns()
        except JobCancelled as exc:
            self.abandoned_running += 1
            restarted = " (its worker was restarted)" if exc.killed else ""
            if is_active is not None and not is_active():
                raise Cancelled(f"the call ended while measuring {what}; the measurement was "
                                f"abandoned{restarted}") from None
            raise DeadlineError(f"the client's deadline passed while measuring {what}; the "
                                f"measurement was abandoned{restarted}: raise the timeout"
                                ) from None
        except (Cancelled, DeadlineError):
            if not holding:
                self.abandoned_queued += 1
            raise
        conditions = resolved.conditions(fingerprint=self.fingerprint, ort_version=ort.__version__,
                                         pinned_cpus=self.pinned_cpus)
        return Timed(timing=timing, conditions=conditions, started_unix_ns=started,
                     finished_unix_ns=finished, config_hash=config_hash, state=read_state(),
                     queued_s=queued_s)
