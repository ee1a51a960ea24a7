"""Is the device still the device the table is being measured on? Every measurement comes back
with the device's state as it ended (a `DeviceState`: load, per-core MHz, temperatures,
battery); this watches those readings for the things that make a phone's timings drift: heating
up, a throttled CPU clock, another load, a charger plugged in or out.

It only reads the state it is given, so it is the same for one device or a pool; the LUT builder
logs its warnings, keeps them in the build report, and may pause for a cool-down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from device_server.device_state import DeviceState
from device_server.spec import SessionSpec

__all__ = ["WatchLimits", "DeviceWatch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchLimits:
    max_temp_rise_c: float = 10.0   # a zone this much above its first reading: too hot
    min_clock_ratio: float = 0.8    # fastest core below this share of the fastest seen: throttled
    extra_load: float = 1.5         # 1-min load above measuring threads + this: another load


@dataclass
class DeviceWatch:
    """Feed it `observe(state)` per measurement; it returns each problem once when it starts
    (not once per measurement) and again only after it has cleared."""

    limits: WatchLimits = WatchLimits()
    threads: int = 1                                   # ORT threads the measurements use
    first_temp: dict[str, float] = field(default_factory=dict)
    top_mhz: float = 0.0
    charging: str | None = None
    active: set[str] = field(default_factory=set)     # problem kinds warned and not cleared
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def for_session(cls, session: SessionSpec, default_threads: int,
                    limits: WatchLimits = WatchLimits()) -> DeviceWatch:
        """A watch for measurements under `session` on a daemon whose default thread count is
        `default_threads` (what "0 threads" in the session resolves to)."""
        return cls(limits, threads=session.with_threads(default_threads).intra_op_threads)

    def problems(self, state: DeviceState) -> dict[str, str]:
        """Kind -> description of what is wrong in `state` (does not remember anything)."""
        out: dict[str, str] = {}
        hot = [(k, v - self.first_temp[k]) for k, v in state.temperatures_c().items()
               if k in self.first_temp and v - self.first_temp[k] > self.limits.max_temp_rise_c]
        if hot:
            zone, rise = max(hot, key=lambda kv: kv[1])
            out["heat"] = (f"{zone} is {rise:+.1f} °C above its first reading (limit "
                           f"+{self.limits.max_temp_rise_c:g} °C): timings may be throttled")
        mhz = state.top_mhz()
        if mhz and self.top_mhz and mhz < self.limits.min_clock_ratio * self.top_mhz:
            out["clock"] = (f"fastest core at {mhz:.0f} MHz, {mhz / self.top_mhz:.0%} of the "
                            f"{self.top_mhz:.0f} MHz seen before: the CPU is throttled")
        load = state.load.one_min if state.load is not None else None
        if load is not None and load > self.threads + self.limits.extra_load:
            out["load"] = (f"1-minute load {load:.2f} with {self.threads} measuring thread(s): "
                           f"something else is running on the device")
        status = state.battery_status()
        if status is not None and self.charging is not None and status != self.charging:
            out["power"] = (f"battery went from {self.charging} to {status}: phones clock "
                            f"differently on and off the charger")
        return out

    def observe(self, state: DeviceState) -> list[str]:
        """Takes one reading; returns the problems that start with it."""
        for zone, value in state.temperatures_c().items():
            self.first_temp.setdefault(zone, value)
        found = self.problems(state)
        self.top_mhz = max(self.top_mhz, state.top_mhz())
        if (status := state.battery_status()) is not None:
            self.charging = status
        new = [text for kind, text in found.items() if kind not in self.active]
        self.active = set(found) - {"power"}  # a charger change is an event, not a condition
        for text in new:
            log.warning("device state: %s", text)
        self.warnings.extend(new)
        return new

    def is_hot(self, state: DeviceState) -> bool:
        """Still too hot or throttled to measure (what a cool-down waits out)."""
        return bool({"heat", "clock"} & set(self.problems(state)))
