"""What else ran on the device while a measurement was timed.

Two readings, both from the kernel, both cheap enough to take around every sample:

- **Preemption** of the timing process: its involuntary context switches
  (`getrusage().ru_nivcsw`). A sample during which the OS switched the timer out holds another
  task's time; the timer takes it again instead of averaging it in.
- **Other load and steal** on the cores the daemon may run on, from `/proc/stat`: the cores'
  busy time minus this process's own CPU time, and the time a hypervisor gave those cores to
  someone else (steal), each per second of wall time. Neither tells which sample was hit, so
  they travel with the timing for the host to judge (and on an Android app, where `/proc/stat`
  is not readable, they are unknown: -1).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

__all__ = ["preemptions", "CpuMeter", "CpuReading"]

_STAT = "/proc/stat"


def preemptions() -> int:
    """Involuntary context switches of this process so far (all its threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


@dataclass(frozen=True)
class CpuReading:
    other_load: float   # cores' worth of other work; -1 when /proc/stat is unreadable
    steal: float        # cores' worth of time taken by the hypervisor; -1 when unknown


def _cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set()


def _read_stat(cores: set[int]) -> tuple[float, float] | None:
    """(busy seconds, steal seconds) summed over `cores` (all cores when empty)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = steal = 0
    found = False
    try:
        with open(_STAT) as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *fields = line.split()
                if name == "cpu" or (cores and int(name[3:]) not in cores):
                    continue
                v = [int(x) for x in fields[:8]]
                # user nice system idle iowait irq softirq steal
                busy += v[0] + v[1] + v[2] + v[5] + v[6]
                steal += v[7]
                found = True
    except (OSError, ValueError, IndexError):
        return None
    return (busy / tick, steal / tick) if found else None


class CpuMeter:
    """Start before the timed phase, `stop()` after it: the other load and steal meanwhile."""

    def __init__(self) -> None:
        self._cores = _cores()
        self._wall = time.monotonic()
        self._own = time.process_time()
        self._stat = _read_stat(self._cores)

    def stop(self) -> CpuReading:
        wall = time.monotonic() - self._wall
        own = time.process_time() - self._own
        end = _read_stat(self._cores)
        # /proc/stat counts in clock ticks (10 ms): too coarse for a short phase.
        if self._stat is None or end is None or wall < 0.05:
            return CpuReading(-1.0, -1.0)
        busy = end[0] - self._stat[0]
        steal = end[1] - self._stat[1]
        return CpuReading(max(0.0, busy - own) / wall, max(0.0, steal) / wall)
