"""A device described for people: its core clusters, where the daemon is pinned, one line.

    clusters  4x Cortex-A510 @ 1.70 GHz (cpu0-3), 4x Cortex-A715 @ 2.37 GHz (cpu4-7), ...
    pinned    cpu4-8: 4x Cortex-A715 + 1x Cortex-X3
    device    aarch64 Linux, Google Pixel 8 (zuma), Android 14: 4x Cortex-A510 + ...
"""

from __future__ import annotations

import dataclasses

from device_server.cpu_topology import CpuCluster, describe_clusters, format_cpu_list
from host.device.client import DeviceInfo

__all__ = ["clusters_line", "pinning_line", "device_line"]


def _cluster(c: CpuCluster) -> str:
    clock = f" @ {c.max_freq_khz / 1e6:.2f} GHz" if c.max_freq_khz else ""
    return f"{c.count}x {c.core}{clock} (cpu{format_cpu_list(c.cpus)})"


def clusters_line(info: DeviceInfo) -> str:
    return ", ".join(_cluster(c) for c in info.clusters)


def pinning_line(info: DeviceInfo) -> str:
    """Which cores the daemon may run on, and what they are."""
    if not info.pinned_cpus:
        return "unknown (an older daemon)"
    if not info.pinned:
        return f"not pinned (all {len(info.pinned_cpus)} cores; serve --cpus pins it)"
    pinned = set(info.pinned_cpus)
    within = [dataclasses.replace(c, cpus=tuple(sorted(pinned & set(c.cpus))))
              for c in info.clusters if pinned & set(c.cpus)]
    return f"cpu{format_cpu_list(pinned)}: {describe_clusters(within)}"


def device_line(info: DeviceInfo) -> str:
    """'aarch64 Linux, Raspberry Pi 5 Model B Rev 1.0 (brcm,bcm2712): 4x Cortex-A76'."""
    what = info.product_model or info.board_model
    if info.soc:
        what = f"{what} ({info.soc})" if what else info.soc
    system = f"{info.machine} {info.os}"
    if info.android_version:
        system += f", Android {info.android_version}"
    cores = describe_clusters(info.clusters) or f"{info.cpu_count}x {info.cpu_model}"
    return f"{system}{', ' + what if what else ''}: {cores}"
