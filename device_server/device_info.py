"""What device this is (the fingerprint a lookup table is tied to) and its readable state.

Read from /proc and /sys where they exist (Linux, Android/Termux, boards); every probe degrades
to an empty value elsewhere instead of failing. The identity names the kind of device, not the
unit: two phones of one model with one OS build share a fingerprint (a table built on one holds
for the other), and nothing that changes across reboots (boot id, uptime, clocks, BogoMIPS,
serial numbers) goes into it. What it reads:

- each core's kind from /proc/cpuinfo (arm64: implementer/part/variant/revision, so the
  clusters of a big.LITTLE phone are named), grouped with sysfs `cpuinfo_max_freq`;
- a board's `/proc/device-tree/model` and `compatible` (Raspberry Pi, Jetson), or DMI on PCs;
- on Android, `getprop`: ro.product.manufacturer/model, ro.soc.manufacturer/model,
  ro.build.fingerprint, ro.build.version.release;
- the ONNX Runtime build's execution providers.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

import device_server
from device_server import android_props
from device_server.cpu_topology import (
    CpuCluster,
    clusters_of,
    describe_clusters,
    format_cpu_list,
    parse_cpuinfo,
    read_max_freqs_khz,
)

__all__ = ["DeviceIdentity", "StateReader", "probe_identity", "read_state"]


@dataclass(frozen=True)
class DeviceIdentity:
    cpu_model: str                 # x86: the model name; ARM: "4x Cortex-A55 + 4x Cortex-A76"
    cpu_count: int
    machine: str
    os: str
    os_release: str
    android_version: str
    ort_version: str
    providers: tuple[str, ...]
    daemon_version: str
    python_version: str
    clusters: tuple[CpuCluster, ...] = ()
    board_model: str = ""          # device tree `model` (boards), DMI vendor + product (PCs)
    soc: str = ""                  # "Google Tensor G3", "brcm,bcm2712", cpuinfo's Hardware
    product_model: str = ""        # Android: manufacturer + model, e.g. "Google Pixel 8"
    build_fingerprint: str = ""    # Android: ro.build.fingerprint
    pinned_cpus: tuple[int, ...] = ()  # the daemon's CPU affinity, as probed at start

    @property
    def cpu_signature(self) -> str:
        """Which kind of core each CPU is: '0-3=0x41:0xd46 r1p1;4-7=…'. Clock speeds are left
        out (a cpufreq driver that fails to load must not make a new device)."""
        if not self.clusters:
            return f"{self.cpu_model} x{self.cpu_count}"
        by_ident: dict[str, list[int]] = {}
        for cluster in self.clusters:
            by_ident.setdefault(cluster.ident, []).extend(cluster.cpus)
        runs = sorted((min(cpus), format_cpu_list(cpus), ident)
                      for ident, cpus in by_ident.items())
        return ";".join(f"{cpus}={ident}" for _, cpus, ident in runs)

    def info_fields(self) -> dict[str, Any]:
        """The DeviceInfo fields beyond the CPU model (16-21 in device.proto), as keyword
        arguments for the message; plain values, so this module needs no generated code."""
        return {
            "clusters": [{"core": c.core, "ident": c.ident, "cpus": list(c.cpus),
                          "max_freq_khz": c.max_freq_khz} for c in self.clusters],
            "pinned_cpus": list(self.pinned_cpus),
            "board_model": self.board_model,
            "soc": self.soc,
            "product_model": self.product_model,
            "build_fingerprint": self.build_fingerprint,
        }

    @property
    def fingerprint(self) -> str:
        """Hash of the hardware, OS build and ORT build identity. The ORT and daemon versions
        are conditions of their own (kept beside the fingerprint in a table's identity)."""
        parts = {
            "machine": self.machine,
            "os": self.os,
            "android": self.android_version,
            "cpus": self.cpu_signature,
            "board": self.board_model,
            "soc": self.soc,
            "product": self.product_model,
            "build": self.build_fingerprint,
            "providers": ",".join(sorted(self.providers)),
        }
        ident = "|".join(f"{k}={v}" for k, v in parts.items())
        return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _read(path: str | Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _device_tree(root: Path, name: str) -> list[str]:
    """A device-tree string property (NUL-separated list), from either place kernels put it."""
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        try:
            raw = (root / base / name).read_bytes()
        except OSError:
            continue
        return [s.decode("utf-8", "replace") for s in raw.split(b"\0") if s.strip()]
    return []


def _dmi_model(root: Path) -> str:
    dmi = root / "sys/class/dmi/id"
    words = [_read(dmi / "sys_vendor"), _read(dmi / "product_name")]
    return " ".join(w for w in words if w and w.lower() not in ("to be filled by o.e.m.",))


def _soc(props: Mapping[str, str], compatible: Sequence[str], hardware: str) -> str:
    if props.get("ro.soc.model"):
        return " ".join(p for p in (props.get("ro.soc.manufacturer", ""), props["ro.soc.model"])
                        if p)
    if compatible:
        return compatible[-1]  # the most general entry names the SoC: "brcm,bcm2712"
    return hardware or props.get("ro.board.platform", "")


def _product(props: Mapping[str, str]) -> str:
    maker, model = props.get("ro.product.manufacturer", ""), props.get("ro.product.model", "")
    if maker and model.lower().startswith(maker.lower()):
        return model
    return " ".join(p for p in (maker, model) if p)


def _affinity() -> tuple[int, ...]:
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return ()


def probe_identity(root: str | os.PathLike[str] = "/", getprop: str | None = "getprop",
                   providers: Sequence[str] | None = None,
                   affinity: Iterable[int] | None = None) -> DeviceIdentity:
    """This device's identity.

    Args:
        root: where /proc and /sys are (a recorded tree in tests).
        getprop: Android's property tool, looked up on PATH; None: not Android.
        providers: the ORT providers (default: this ORT build's).
        affinity: the CPUs this process may run on (default: its affinity).
    """
    base = Path(root)
    cpuinfo = parse_cpuinfo(_read(base / "proc/cpuinfo"))
    freqs = read_max_freqs_khz(base / "sys/devices/system/cpu", cpuinfo.cores)
    clusters = clusters_of(cpuinfo.cores, freqs)
    props = android_props.read_props(getprop)
    compatible = _device_tree(base, "compatible")
    board = next(iter(_device_tree(base, "model")), "") or _dmi_model(base)
    if not clusters:
        cpu_model = platform.processor() or platform.machine()
    elif any(c.ident.startswith("0x") for c in clusters):
        cpu_model = describe_clusters(clusters)
    else:
        cpu_model = clusters[0].core
    return DeviceIdentity(
        cpu_model=cpu_model,
        cpu_count=len(cpuinfo.cores) or os.cpu_count() or 1,
        machine=platform.machine(),
        os=platform.system(),
        os_release=platform.release(),
        android_version=props.get("ro.build.version.release", ""),
        ort_version=ort.__version__,
        providers=tuple(ort.get_available_providers() if providers is None else providers),
        daemon_version=device_server.__version__,
        python_version=platform.python_version(),
        clusters=clusters,
        board_model=board,
        soc=_soc(props, compatible, cpuinfo.extra.get("Hardware", "")),
        product_model=_product(props),
        build_fingerprint=props.get("ro.build.fingerprint", ""),
        pinned_cpus=tuple(sorted(affinity)) if affinity is not None else _affinity(),
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
