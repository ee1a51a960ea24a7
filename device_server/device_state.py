"""The device's state as the OS lets the daemon read it: load, per-core clocks, temperatures and
battery. Read after every measurement and on GetDeviceInfo, so the host can tell when a phone
heats up, throttles, gets another load or goes on or off the charger (host/device/watch.py).

Typed, as `DeviceState` in protos/device.proto: each part is absent (None, or no entry) where
it cannot be read, never a made-up value.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass

__all__ = ["LoadAverage", "CoreClock", "ThermalZone", "Battery", "DeviceState", "StateReader",
           "read_state"]


@dataclass(frozen=True, kw_only=True)
class LoadAverage:
    """Runnable (on Linux also uninterruptible) tasks averaged over 1, 5 and 15 minutes."""

    one_min: float
    five_min: float
    fifteen_min: float


@dataclass(frozen=True, kw_only=True)
class CoreClock:
    cpu: int   # logical CPU number
    mhz: int   # current clock (sysfs scaling_cur_freq)


@dataclass(frozen=True, kw_only=True)
class ThermalZone:
    type: str      # the zone's `type`, e.g. "cpu-thermal", "x86_pkg_temp"
    temp_c: float


@dataclass(frozen=True, kw_only=True)
class Battery:
    name: str                    # the power supply, e.g. "battery" (Android), "BAT0" (laptops)
    percent: int | None = None   # None: not readable
    status: str = ""             # Charging, Discharging, Full, Not charging; "" unknown
    temp_c: float | None = None  # None: not readable


@dataclass(frozen=True, kw_only=True)
class DeviceState:
    """What was readable of the device's state at one moment."""

    load: LoadAverage | None = None          # None where getloadavg fails
    clocks: tuple[CoreClock, ...] = ()       # in CPU order
    thermal_zones: tuple[ThermalZone, ...] = ()  # one per zone type
    batteries: tuple[Battery, ...] = ()

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the proto's field names, lists for the repeated parts."""
        return {
            "load": dataclasses.asdict(self.load) if self.load is not None else None,
            "clocks": [dataclasses.asdict(c) for c in self.clocks],
            "thermal_zones": [dataclasses.asdict(z) for z in self.thermal_zones],
            "batteries": [dataclasses.asdict(b) for b in self.batteries],
        }

    def temperatures_c(self) -> dict[str, float]:
        """Every temperature by a readable name: thermal zones by type, batteries as
        "battery" (or "battery NAME" for a supply named otherwise)."""
        out = {z.type: z.temp_c for z in self.thermal_zones}
        for b in self.batteries:
            if b.temp_c is not None:
                out["battery" if b.name == "battery" else f"battery {b.name}"] = b.temp_c
        return out

    def top_mhz(self) -> int:
        """The fastest core's clock (0 when none is readable)."""
        return max((c.mhz for c in self.clocks), default=0)

    def battery_status(self) -> str | None:
        """The first battery's (by name) known charging status, or None."""
        statuses = [b.status for b in sorted(self.batteries, key=lambda b: b.name) if b.status]
        return statuses[0] if statuses else None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _int(text: str) -> int | None:
    return int(text) if text.lstrip("-").isdigit() else None


class StateReader:
    """Reads the device's state cheaply enough to do after every measurement: the files to
    read are found once, then each read is a handful of small /proc and /sys reads.

    Recent Android hides /sys/class/power_supply from apps; there the battery comes from Termux:API
    (`termux-battery-status`, ~1 s a call, so read at most every `battery_every_s`).
    """

    battery_every_s = 60.0

    def __init__(self, power_supplies: str = "/sys/class/power_supply/*",
                 termux_battery: str | None = "termux-battery-status") -> None:
        """`power_supplies`: where sysfs lists them; `termux_battery`: the Termux:API program
        (looked up on PATH), used only when no sysfs battery is readable; None: never."""
        self._freqs = [(int(p.split("/")[5].removeprefix("cpu")), p) for p in sorted(
            glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))]
        self._freqs.sort()
        self._temps = [(_read(f"{z}/type") or os.path.basename(z), f"{z}/temp")
                       for z in sorted(glob.glob("/sys/class/thermal/thermal_zone*"))]
        self._batteries = [(os.path.basename(d), d)
                           for d in sorted(glob.glob(power_supplies))
                           if _read(f"{d}/type") == "Battery"]
        self._termux_battery = (shutil.which(termux_battery)
                                if termux_battery and not self._batteries else None)
        self._battery_cache: tuple[float, Battery | None] = (-float("inf"), None)

    def read(self) -> DeviceState:
        try:
            one, five, fifteen = os.getloadavg()
            load: LoadAverage | None = LoadAverage(one_min=one, five_min=five,
                                                   fifteen_min=fifteen)
        except OSError:
            load = None
        clocks = []
        for cpu, path in self._freqs:
            khz = _read(path)
            if khz.isdigit():
                clocks.append(CoreClock(cpu=cpu, mhz=int(khz) // 1000))
        zones: dict[str, float] = {}  # one per type: the last zone of a type read wins
        for kind, path in self._temps:
            if (milli := _int(_read(path))) is not None:
                zones[kind] = milli / 1000
        batteries = []
        for name, path in self._batteries:
            pct = _read(f"{path}/capacity")
            tenths = _int(_read(f"{path}/temp"))  # tenths of a degree
            battery = Battery(name=name, percent=int(pct) if pct.isdigit() else None,
                              status=_read(f"{path}/status"),
                              temp_c=tenths / 10 if tenths is not None else None)
            if battery != Battery(name=name):
                batteries.append(battery)
        if self._termux_battery and (b := self._termux_battery_state(self._termux_battery)):
            batteries.append(b)
        return DeviceState(
            load=load, clocks=tuple(clocks),
            thermal_zones=tuple(ThermalZone(type=k, temp_c=v) for k, v in zones.items()),
            batteries=tuple(batteries))

    def _termux_battery_state(self, program: str) -> Battery | None:
        read_at, cached = self._battery_cache
        if time.monotonic() - read_at < self.battery_every_s:
            return cached
        battery = None
        try:
            out = subprocess.run([program], capture_output=True, text=True, timeout=10)
            info = json.loads(out.stdout)
            battery = Battery(
                name="battery",
                percent=int(info["percentage"]) if "percentage" in info else None,
                # CHARGING, DISCHARGING, FULL, NOT_CHARGING
                status=(str(info["status"]).title().replace("_", " ")
                        if "status" in info else ""),
                temp_c=float(info["temperature"]) if "temperature" in info else None)
            if battery == Battery(name="battery"):
                battery = None
        except (OSError, subprocess.SubprocessError, ValueError, TypeError, AttributeError):
            pass  # Termux:API app missing or refused: no battery reading, not an error
        self._battery_cache = (time.monotonic(), battery)
        return battery


_reader: StateReader | None = None


def read_state() -> DeviceState:
    """Load, per-core clocks, temperatures and battery, as far as the OS lets us read them."""
    global _reader
    if _reader is None:
        _reader = StateReader()
    return _reader.read()
