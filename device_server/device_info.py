"""What device this is (the fingerprint a lookup table is tied to) and its readable state.

Read from /proc and /sys where they exist (Linux, Android/Termux); every probe degrades to an
empty value elsewhere instead of failing.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass

import onnxruntime as ort

import device_server

__all__ = ["DeviceIdentity", "StateReader", "probe_identity", "read_state"]


@dataclass(frozen=True)
class DeviceIdentity:
    cpu_model: str
    cpu_count: int
    machine: str
    os: str
    os_release: str
    android_version: str
    ort_version: str
    providers: tuple[str, ...]
    daemon_version: str
    python_version: str

    @property
    def fingerprint(self) -> str:
        """Hash of the hardware and OS identity. Runtime versions are conditions of their own
        (kept beside the fingerprint in a table's identity), so they are not part of it."""
        ident = "|".join(
            [self.cpu_model, str(self.cpu_count), self.machine, self.os, self.android_version]
        )
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Hardware", "Processor", "cpu model"):
            if value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def _android_version() -> str:
    getprop = shutil.which("getprop")
    if not getprop:
        return ""
    try:
        out = subprocess.run(
            [getprop, "ro.build.version.release"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def probe_identity() -> DeviceIdentity:
    return DeviceIdentity(
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        machine=platform.machine(),
        os=platform.system(),
        os_release=platform.release(),
        android_version=_android_version(),
        ort_version=ort.__version__,
        providers=tuple(ort.get_available_providers()),
        daemon_version=device_server.__version__,
        python_version=platform.python_version(),
    )


class StateReader:
    """Reads the device's state cheaply enough to do after every measurement: the files to
    read are found once, then each read is a handful of small /proc and /sys reads.

    Keys: `loadavg` ("1m 5m 15m"), `freq_mhz.cpuN`, `temp_c.<zone type>`, and on phones and
    laptops `battery.<supply>.{pct,status,temp_c}` (status: Charging, Discharging, Full...).
    Recent Android hides /sys/class/power_supply from apps; there the battery comes from Termux:API
    (`termux-battery-status`, ~1 s a call, so read at most every `battery_every_s`).
    """

    battery_every_s = 60.0

    def __init__(self, power_supplies: str = "/sys/class/power_supply/*",
                 termux_battery: str | None = "termux-battery-status") -> None:
        """`power_supplies`: where sysfs lists them; `termux_battery`: the Termux:API program
        (looked up on PATH), used only when no sysfs battery is readable; None: never."""
        self._freqs = [(p.split("/")[5], p) for p in sorted(
            glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"))]
        self._temps = [(_read(f"{z}/type") or os.path.basename(z), f"{z}/temp")
                       for z in sorted(glob.glob("/sys/class/thermal/thermal_zone*"))]
        self._batteries = [(os.path.basename(d), d)
                           for d in sorted(glob.glob(power_supplies))
                           if _read(f"{d}/type") == "Battery"]
        self._termux_battery = (shutil.which(termux_battery)
                                if termux_battery and not self._batteries else None)
        self._battery_cache: tuple[float, dict[str, str]] = (-float("inf"), {})

    def read(self) -> dict[str, str]:
        state: dict[str, str] = {}
        try:
            state["loadavg"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
        except OSError:
            pass
        for cpu, path in self._freqs:
            khz = _read(path)
            if khz.isdigit():
                state[f"freq_mhz.{cpu}"] = str(int(khz) // 1000)
        for kind, path in self._temps:
            temp = _read(path)
            if temp.lstrip("-").isdigit():
                state[f"temp_c.{kind}"] = f"{int(temp) / 1000:.1f}"
        for name, path in self._batteries:
            if (pct := _read(f"{path}/capacity")).isdigit():
                state[f"battery.{name}.pct"] = pct
            if status := _read(f"{path}/status"):
                state[f"battery.{name}.status"] = status
            if (temp := _read(f"{path}/temp")).lstrip("-").isdigit():  # tenths of a degree
                state[f"battery.{name}.temp_c"] = f"{int(temp) / 10:.1f}"
        if self._termux_battery:
            state.update(self._termux_battery_state(self._termux_battery))
        return state

    def _termux_battery_state(self, program: str) -> dict[str, str]:
        read_at, cached = self._battery_cache
        if time.monotonic() - read_at < self.battery_every_s:
            return cached
        state: dict[str, str] = {}
        try:
            out = subprocess.run([program], capture_output=True, text=True, timeout=10)
            info = json.loads(out.stdout)
            if "percentage" in info:
                state["battery.battery.pct"] = str(int(info["percentage"]))
            if "status" in info:  # CHARGING, DISCHARGING, FULL, NOT_CHARGING
                state["battery.battery.status"] = str(info["status"]).title().replace("_", " ")
            if "temperature" in info:
                state["battery.battery.temp_c"] = f"{float(info['temperature']):.1f}"
        except (OSError, subprocess.SubprocessError, ValueError, TypeError, AttributeError):
            pass  # Termux:API app missing or refused: no battery reading, not an error
        self._battery_cache = (time.monotonic(), state)
        return state


_reader: StateReader | None = None


def read_state() -> dict[str, str]:
    """Load, per-core frequency, temperatures and battery, as far as the OS lets us read them."""
    global _reader
    if _reader is None:
        _reader = StateReader()
    return _reader.read()
