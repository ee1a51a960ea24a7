"""The CPU cores of a device: what each one is (from /proc/cpuinfo), grouped into clusters.

On arm64 each core prints its own `CPU implementer` / `CPU part` / `CPU variant` /
`CPU revision`: a big.LITTLE phone shows several kinds, e.g. 4x Cortex-A55 + 3x Cortex-A78 +
1x Cortex-X1. x86 prints `vendor_id`, `cpu family`, `model`, `stepping` and `model name`.
A cluster is a run of cores of one kind with one maximum clock (sysfs `cpuinfo_max_freq`, a
property of the silicon, not of the moment); the same kind at two clocks is two clusters, as on
phones with a "prime" core.

Only what stays the same across reboots goes into `CoreKind`: not BogoMIPS (recomputed at boot
on x86), current clocks, feature flags (they follow the kernel version) or serial numbers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from device_server.cpu_parts import core_name

__all__ = ["CoreKind", "CpuCluster", "CpuInfo", "parse_cpuinfo", "clusters_of",
           "read_max_freqs_khz", "parse_cpu_list", "format_cpu_list", "describe_clusters"]

_ARM_KEYS = ("CPU implementer", "CPU part", "CPU variant", "CPU revision")


@dataclass(frozen=True)
class CoreKind:
    """What a core is. `name` is for people (`Cortex-A78`, `AMD EPYC 7B13`); `ident` is the
    exact id (`0x41:0xd41 r1p1`, `AuthenticAMD 25/1/1`), which tells revisions apart."""

    name: str
    ident: str


@dataclass(frozen=True, kw_only=True)
class CpuCluster:
    """Cores of one kind and one maximum clock (0: not readable, e.g. in a VM)."""

    core: str                     # e.g. "Cortex-A78"
    ident: str                    # e.g. "0x41:0xd41 r1p1"
    cpus: tuple[int, ...]         # logical CPU numbers, ascending
    max_freq_khz: int = 0

    @property
    def count(self) -> int:
        return len(self.cpus)


@dataclass(frozen=True)
class CpuInfo:
    """/proc/cpuinfo, parsed: the kind of each logical CPU and the lines that are not per-core
    (`Hardware`, `Model` on a Raspberry Pi, `Processor` on old 32-bit kernels)."""

    cores: dict[int, CoreKind]
    extra: dict[str, str]


def confined_cpus(affinity: Iterable[int], clusters: Iterable[CpuCluster],
                  cpu_count: int) -> tuple[int, ...]:
    """The cores a process is confined to, sorted: () when its affinity covers every core known
    (the clusters', else 0..cpu_count-1), i.e. when it is not pinned."""
    every = {cpu for c in clusters for cpu in c.cpus} or set(range(cpu_count))
    pinned = set(affinity)
    return tuple(sorted(pinned)) if pinned and pinned < every else ()


def _int(text: str) -> int | None:
    """'0x41' (hex, as the ids are printed) or '12' (decimal, as revisions are)."""
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None


def _kind(fields: Mapping[str, str]) -> CoreKind | None:
    arm = [_int(fields[k]) if k in fields else None for k in _ARM_KEYS]
    implementer, part, variant, revision = arm
    if implementer is not None and part is not None:
        rev = (f" r{variant}p{revision}" if variant is not None and revision is not None
               else "")
        return CoreKind(core_name(implementer, part), f"0x{implementer:02x}:0x{part:03x}{rev}")
    if "vendor_id" in fields or "model name" in fields:
        ident = f"{fields.get('vendor_id', '?')} " + "/".join(
            fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
        return CoreKind(fields.get("model name") or ident, ident)
    if "cpu model" in fields:  # MIPS
        return CoreKind(fields["cpu model"], fields["cpu model"])
    if "uarch" in fields or "isa" in fields:  # RISC-V
        name = fields.get("uarch") or fields.get("isa", "")
        return CoreKind(name, name)
    return None


def parse_cpuinfo(text: str) -> CpuInfo:
    """Each `processor : N` line starts a core, whose lines run to the next blank line; other
    lines (`Hardware`, a Raspberry Pi's `Model`) go to `extra`. Old 32-bit kernels print the
    ARM ids once for all cores: those apply to every core that has none of its own."""
    per_core: dict[int, dict[str, str]] = {}
    shared: dict[str, str] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if not line.strip():
            current = None
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor" and value.isdigit():
            current = per_core.setdefault(int(value), {})
        elif current is not None:
            current[key] = value
        else:
            shared[key] = value
    common = {k: v for k, v in shared.items() if k in _ARM_KEYS}
    cores: dict[int, CoreKind] = {}
    for number in sorted(per_core):
        kind = _kind({**common, **per_core[number]})
        if kind is not None:
            cores[number] = kind
    extra = {k: v for k, v in shared.items() if k not in _ARM_KEYS}
    return CpuInfo(cores, extra)


def read_max_freqs_khz(sys_cpu: Path, cpus: Iterable[int]) -> dict[int, int]:
    """Each CPU's `cpufreq/cpuinfo_max_freq` under `sys_cpu` (/sys/devices/system/cpu), where
    readable. The hardware's ceiling, unlike `scaling_max_freq`, which thermal limits move."""
    freqs: dict[int, int] = {}
    for cpu in cpus:
        try:
            text = (sys_cpu / f"cpu{cpu}" / "cpufreq" / "cpuinfo_max_freq").read_text()
        except OSError:
            continue
        if text.strip().isdigit():
            freqs[cpu] = int(text.strip())
    return freqs


def clusters_of(cores: Mapping[int, CoreKind], max_freqs_khz: Mapping[int, int]
                ) -> tuple[CpuCluster, ...]:
    """Cores grouped by (kind, maximum clock), in the order of their first CPU."""
    groups: dict[tuple[CoreKind, int], list[int]] = {}
    for cpu in sorted(cores):
        groups.setdefault((cores[cpu], max_freqs_khz.get(cpu, 0)), []).append(cpu)
    clusters = [CpuCluster(core=kind.name, ident=kind.ident, cpus=tuple(cpus), max_freq_khz=freq)
                for (kind, freq), cpus in groups.items()]
    return tuple(sorted(clusters, key=lambda c: c.cpus[0]))


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'4-7', '0,2,4-5' or the kernel's '0 1 2 3' -> sorted CPU numbers.

    Raises:
        ValueError: not a CPU list; the message shows the expected form.
    """
    cpus: set[int] = set()
    for part in re.split(r"\s*,\s*|\s+", text.strip()):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"not a CPU list: {text!r} (expected e.g. 0, 4-7 or 0,2,4-5)")
        cpus.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 6) -> '0-3,6'."""
    ordered = sorted(set(cpus))
    runs: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


def describe_clusters(clusters: Iterable[CpuCluster]) -> str:
    """'4x Cortex-A55 + 3x Cortex-A78 + 1x Cortex-X1'."""
    return " + ".join(f"{c.count}x {c.core}" for c in clusters)
