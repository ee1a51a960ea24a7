"""What device this is: the fingerprint a lookup table is tied to (its changing state, load,
clocks and temperatures, is device_state.py's).

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

import hashlib
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

import device_server
from device_server import android_props
from device_server.cpu_topology import (
    CpuCluster,
    clusters_of,
    confined_cpus,
    describe_clusters,
    format_cpu_list,
    parse_cpuinfo,
    read_max_freqs_khz,
)

__all__ = ["DeviceIdentity", "probe_identity"]


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
    def confined_to(self) -> tuple[int, ...]:
        """The cores the daemon is confined to, for a timing's conditions: () when its affinity
        covers every core it knows of (not pinned)."""
        return confined_cpus(self.pinned_cpus, self.clusters, self.cpu_count)

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
