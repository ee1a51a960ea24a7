"""Layer units timed side by side in interleaved passes: for differences between units that a
table cannot resolve.

A lookup table times each unit once (or a few times) while it is built, minutes or days before
the engine reads it. Two units whose latencies differ by a few percent of a key's noise then
differ in the table by whatever the device was doing when each was timed. Timed again in the
same passes, alternating the order each pass, a drift or burst of the device moves both alike,
and the difference between them, pass by pass, is what the device resolves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from host.device.client import DeviceClient
from host.device.results import MeasureFailure

__all__ = ["UnitPasses", "measure_unit_passes"]


@dataclass
class UnitPasses:
    """Each unit's robust figure (ms), one per pass, every unit in every pass."""

    specs: list[LayerSpec]
    values: list[dict[LayerSpec, float]] = field(default_factory=list)  # [pass][unit] ms
    seconds: float = 0.0

    @property
    def passes(self) -> int:
        return len(self.values)


def measure_unit_passes(
    client: DeviceClient,
    specs: Sequence[LayerSpec],
    session: SessionSpec,
    policy: MeasurePolicy,
    settled: Callable[[UnitPasses], bool],
    min_passes: int,
    max_passes: int,
    max_seconds: float,
) -> UnitPasses:
    """Times every unit of `specs` once per pass (the order reversed every other pass) until
    `settled(passes)` after `min_passes`, or `max_passes`, or `max_seconds`.

    Raises:
        host.device.results.DeviceError: the device failed the stream or one of the units.
    """
    if not 1 <= min_passes <= max_passes:
        raise ValueError("need 1 <= min_passes <= max_passes")
    t0 = time.monotonic()
    out = UnitPasses(list(dict.fromkeys(specs)))
    while out.passes < max_passes:
        order = out.specs if out.passes % 2 == 0 else out.specs[::-1]
        got: dict[LayerSpec, float] = {}
        for result in client.measure_many(order, session, policy):
            if isinstance(result, MeasureFailure):
                raise result.to_error()
            assert result.spec is not None
            got[result.spec] = result.timing.robust_ms
        out.values.append(got)
        if out.passes >= min_passes and (settled(out) or time.monotonic() - t0 > max_seconds):
            break
    out.seconds = time.monotonic() - t0
    return out
