"""What a measurement daemon answers, as the host's dataclasses: who the device is
(`DeviceInfo`), a timing with its conditions (`Measurement`), an item of a stream the daemon
could not measure (`MeasureFailure`), and the error a failed call raises (`DeviceError`).

Built from the wire in host/device/wire.py only, by keyword. Imports neither torch nor onnx.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from device_server.cpu_topology import CpuCluster, confined_cpus
from device_server.device_state import DeviceState
from device_server.spec import LayerSpec
from device_server.stats import Conditions, TimingStats

__all__ = ["DeviceError", "DeviceInfo", "Measurement", "MeasureFailure", "MeasureResult"]


class DeviceError(Exception):
    """A call to the daemon failed. `code` is the gRPC status code name (e.g. "NOT_FOUND");
    `address` the daemon's, when one device is to blame."""

    def __init__(self, code: str, message: str, address: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.address = address

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class DeviceInfo:
    """Who the device is: the fingerprint a lookup table is tied to, its runtime and queue."""

    fingerprint: str
    cpu_model: str
    cpu_count: int
    machine: str
    os: str
    os_release: str
    android_version: str  # empty off Android
    ort_version: str
    providers: tuple[str, ...]
    daemon_version: str
    python_version: str
    queue_depth: int  # measurements running or waiting when asked
    max_queue_depth: int  # beyond this, requests get RESOURCE_EXHAUSTED
    default_threads: int
    state: DeviceState = DeviceState()  # load, clocks, temperatures, battery, as read when asked
    clusters: tuple[CpuCluster, ...] = ()  # the cores by kind and clock (big.LITTLE: several)
    pinned_cpus: tuple[int, ...] = ()  # the daemon's CPU affinity (all CPUs: not pinned)
    board_model: str = ""  # device tree model (boards), DMI product (PCs)
    soc: str = ""
    product_model: str = ""  # Android: manufacturer + model
    build_fingerprint: str = ""  # Android: the OS build

    @property
    def confined_to(self) -> tuple[int, ...]:
        """The cores the daemon is confined to (`serve --cpus`), as a timing's conditions name
        them: () when it may run on every core."""
        return confined_cpus(self.pinned_cpus, self.clusters, self.cpu_count)

    @property
    def pinned(self) -> bool:
        """Whether the daemon runs on a subset of the cores (`serve --cpus`)."""
        return bool(self.confined_to)

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d["providers"] = list(self.providers)
        d["state"] = self.state.to_dict()
        return d


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One timing taken by the daemon, with the conditions it is valid for.

    `spec` is the layer measured, or None for a whole model (`model_sha256` set) or the
    session overhead. Times `*_unix_ns` are on the daemon's clock.
    """

    request_id: str
    spec: LayerSpec | None
    timing: TimingStats
    conditions: Conditions
    started_unix_ns: int
    finished_unix_ns: int
    config_hash: str
    model_sha256: str | None = None
    state: DeviceState = DeviceState()  # device state as it ended
    index: int = -1  # position in `measure_many`'s input; -1 for single measurements

    @property
    def latency_ms(self) -> float:
        """The figure a lookup table stores: the robust per-call time (`TimingStats.robust_ms`:
        the 10th percentile of the samples the daemon did not see preempted)."""
        return self.timing.robust_ms

    def to_dict(self) -> dict[str, object]:
        timing = dataclasses.asdict(self.timing)
        timing["samples_ms"] = list(self.timing.samples_ms)
        conditions = dataclasses.asdict(self.conditions)
        conditions["provider_options"] = dict(self.conditions.provider_options)
        return {
            "request_id": self.request_id,
            "config": self.spec.to_dict() if self.spec is not None else None,
            "model_sha256": self.model_sha256,
            "config_hash": self.config_hash,
            "timing": timing,
            "conditions": conditions,
            "started_unix_ns": self.started_unix_ns,
            "finished_unix_ns": self.finished_unix_ns,
            "device_state": self.state.to_dict(),
        }


@dataclass(frozen=True, kw_only=True)
class MeasureFailure:
    """An item of `measure_many` the daemon could not measure; the stream went on."""

    request_id: str
    spec: LayerSpec
    code: str  # gRPC status code name, e.g. "INVALID_ARGUMENT"
    message: str
    index: int = -1  # position in `measure_many`'s input

    def to_error(self) -> DeviceError:
        return DeviceError(self.code, self.message)

    def to_dict(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "config": self.spec.to_dict(),
            "error": {"code": self.code, "message": self.message},
        }


MeasureResult = Measurement | MeasureFailure
