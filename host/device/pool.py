"""A pool of measurement daemons with the same fingerprint, sharing one list of layers.

Each device pulls chunks of layers from a shared queue and streams them (MeasureStream); a
device that fails mid-chunk (daemon killed, network gone) has the layers it had not answered
put back on the queue for the others, and leaves the pool. Results are handed to a callback as
they arrive, so the caller can store each one at once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from host.device.client import DeviceClient, DeviceError, DeviceInfo, MeasureFailure, Measurement

__all__ = ["DevicePool", "PoolReport", "DeviceStats", "FingerprintMismatch"]

log = logging.getLogger(__name__)

OnResult = Callable[[Measurement | MeasureFailure], None]


class FingerprintMismatch(ValueError):
    """Devices of one pool must be the same kind of device (same fingerprint and runtime)."""


@dataclass
class DeviceStats:
    address: str
    measured: int = 0
    failed: int = 0
    busy_s: float = 0.0
    lost: str = ""          # why the device left the pool, if it did

    @property
    def per_second(self) -> float:
        return self.measured / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class PoolReport:
    devices: list[DeviceStats] = field(default_factory=list)
    requeued: int = 0       # layers moved to another device after a device failed
    wall_s: float = 0.0


class DevicePool:
    """Daemons that measure interchangeably. Use as a context manager (closes the clients)."""

    def __init__(self, clients: Sequence[DeviceClient], chunk: int = 16) -> None:
        if not clients:
            raise ValueError("a device pool needs at least one device")
        self.clients = list(clients)
        self.chunk = chunk
        self.infos = [c.device_info() for c in self.clients]
        first = self.infos[0]
        for client, info in zip(self.clients[1:], self.infos[1:], strict=True):
            if (info.fingerprint, info.ort_version) != (first.fingerprint, first.ort_version):
                raise FingerprintMismatch(
                    f"{client.address} is device {info.fingerprint} (ORT {info.ort_version}) but "
                    f"{self.clients[0].address} is {first.fingerprint} (ORT {first.ort_version}): "
                    f"a pool shares one lookup table, so its devices must be alike"
                )

    @classmethod
    def connect(cls, addresses: Sequence[str], token: str | None = None,
                timeout_s: float = 60.0, tls_root_cert: str | None = None) -> DevicePool:
        clients = [DeviceClient(a, token=token, tls_root_cert=tls_root_cert,
                                timeout_s=timeout_s) for a in addresses]
        try:
            return cls(clients)
        except BaseException:
            for c in clients:
                c.close()
            raise

    @property
    def info(self) -> DeviceInfo:
        return self.infos[0]

    def close(self) -> None:
        for c in self.clients:
            c.close()

    def __enter__(self) -> DevicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def measure(
        self,
        specs: Sequence[LayerSpec],
        session: SessionSpec,
        policy: MeasurePolicy,
        on_result: OnResult,
    ) -> PoolReport:
        """Measures every spec once on some device of the pool.

        Raises:
            DeviceError: every device failed with layers still to measure (what was measured
                before has been handed to `on_result` and stays valid).
        """
        queue: collections.deque[LayerSpec] = collections.deque(specs)
        cond = threading.Condition()
        in_flight = [0]  # chunks being measured: a failing one may put layers back
        report = PoolReport(devices=[DeviceStats(c.address) for c in self.clients])
        errors: list[DeviceError] = []
        crashes: list[BaseException] = []
        start = time.monotonic()

        def take() -> list[LayerSpec]:
            """The next chunk; empty only once nothing is queued and nothing can come back."""
            with cond:
                while not queue and in_flight[0] > 0:
                    cond.wait()
                chunk = [queue.popleft() for _ in range(min(self.chunk, len(queue)))]
                in_flight[0] += bool(chunk)
                return chunk

        def done(left: list[LayerSpec], exc: DeviceError | None) -> None:
            with cond:
                queue.extendleft(reversed(left))
                report.requeued += len(left)
                if exc is not None:
                    errors.append(exc)
                in_flight[0] -= 1
                cond.notify_all()

        def work(client: DeviceClient, stats: DeviceStats) -> None:
            while True:
                chunk = take()
                if not chunk:
                    return
                answered: set[LayerSpec] = set()
                t0 = time.monotonic()
                try:
                    for result in client.measure_many(chunk, session, policy):
                        answered.add(result.spec)  # type: ignore[arg-type]
                        if isinstance(result, Measurement):
                            stats.measured += 1
                        else:
                            stats.failed += 1
                        on_result(result)
                except DeviceError as exc:
                    left = [s for s in chunk if s not in answered]
                    stats.lost = str(exc)
                    log.warning("device %s left the pool (%s); %d layers re-queued",
                                client.address, exc, len(left))
                    done(left, exc)
                    return
                except BaseException as exc:  # e.g. the callback failed: stop, report below
                    crashes.append(exc)
                    with cond:
                        queue.clear()
                    done([], None)
                    return
                finally:
                    stats.busy_s += time.monotonic() - t0
                done([], None)

        threads = [threading.Thread(target=work, args=(c, s), name=f"pool-{c.address}",
                                    daemon=True)
                   for c, s in zip(self.clients, report.devices, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.wall_s = time.monotonic() - start
        if crashes:
            raise crashes[0]
        if queue:
            raise DeviceError(
                errors[-1].code if errors else "UNAVAILABLE",
                f"every device of the pool failed with {len(queue)} layers left to measure; "
                f"last error: {errors[-1] if errors else 'unknown'}",
                ", ".join(d.address for d in report.devices if d.lost),
            )
        return report
