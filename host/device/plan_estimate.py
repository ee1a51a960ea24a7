"""How big a table's plan is and how long the device will take to fill it, said before the work.

The rate comes from the device itself: a small sample of the keys still to measure is measured
first (and stored: the probe is part of the build, not extra work), timed on the wall clock,
and scaled by the number of devices in the pool (alike devices measure at the same rate).
The estimate assumes the rest costs what the sample did on average; noisy keys measured again
(`NoiseGuard`) and drift checks add a few percent on top.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from host.device.pool import DevicePool
from host.device.table_builder import LUT_POLICY, NoiseGuard, measure_into
from lut.keys import shuffled
from lut.store import LutStore

__all__ = ["PlanEstimate", "estimate_plan", "format_duration"]

log = logging.getLogger(__name__)

SAMPLE = 16  # at most one pool chunk, so one device measures the whole sample


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class PlanEstimate:
    keys: int                      # distinct keys of the plan
    entries: int                   # (unit, combination) pairs before de-duplication
    present: int                   # already in the table before the probe
    passes: int                    # measurements per key
    sampled: int                   # keys measured to find the rate (now in the table)
    keys_per_s: float | None       # the pool's measured rate; None when nothing to measure

    @property
    def to_measure(self) -> int:
        return self.keys - self.present

    @property
    def eta_s(self) -> float | None:
        if not self.keys_per_s:
            return None if self.to_measure else 0.0
        return self.to_measure * self.passes / self.keys_per_s

    def describe(self) -> str:
        head = (f"{self.keys:,} distinct keys ({self.entries:,} entries); {self.present:,} "
                f"already in the table, {self.to_measure:,} to measure")
        if self.eta_s is None or not self.to_measure:
            return head
        passes = f" x {self.passes} passes" if self.passes > 1 else ""
        return (f"{head}{passes}: ~{format_duration(self.eta_s)} at {self.keys_per_s:.1f} "
                f"keys/s (measured on {self.sampled} of them)")

    def to_dict(self) -> dict[str, object]:
        return {"keys": self.keys, "entries": self.entries, "present": self.present,
                "to_measure": self.to_measure, "passes": self.passes,
                "sampled": self.sampled,
                "keys_per_s": None if self.keys_per_s is None else round(self.keys_per_s, 2),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1)}


def estimate_plan(store: LutStore, pool: DevicePool, specs: Sequence[LayerSpec], entries: int,
                  session: SessionSpec, policy: MeasurePolicy = LUT_POLICY, passes: int = 1,
                  seed: int = 0, sample: int = SAMPLE) -> PlanEstimate:
    """Counts what the table lacks of `specs` and measures a seeded sample of it for the rate."""
    missing = set(store.missing([s.key() for s in specs]))
    todo = [s for s in specs if s.key() in missing]
    probe = shuffled(todo, seed)[:min(sample, pool.chunk)]
    rate = None
    if probe:
        t0 = time.monotonic()
        measure_into(store, pool, probe, session, policy, noise=NoiseGuard(retries=0))
        elapsed = time.monotonic() - t0
        # One chunk goes to one device: the probe ran at one device's rate.
        rate = len(probe) / elapsed * len(pool.clients) if elapsed > 0 else None
        log.info("rate probe: %d keys in %.2f s", len(probe), elapsed)
    return PlanEstimate(len(specs), entries, len(specs) - len(todo), passes, len(probe), rate)
