"""A noisy neighbour you can switch on: bursty CPU and memory-bandwidth load, seeded and
bounded in time, so that robustness to interference is tested and benchmarked reproducibly
instead of hoped for.

One process per chosen core, pinned to it, alternates bursts and pauses whose lengths are
drawn from a seeded generator: a burst streams a buffer larger than the last-level cache
(memory bandwidth, cache pollution) and multiplies small matrices (ALU, the core's time);
a pause sleeps. This is what a phone's background app or a shared workstation does to a
measurement: the OS preempts the timer on its core and the neighbour's memory traffic slows
the other cores. Every process stops at its deadline, or when its parent dies.

    with NoisyNeighbour(cores=[0, 1], seed=0, duty=0.5):
        ...  # measure

    python -m host.device.noisy_neighbour --seconds 600 --cores 0,1 --duty 0.5   # from a shell
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

__all__ = ["NeighbourConfig", "NoisyNeighbour", "main"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeighbourConfig:
    """What the neighbour does, per core."""

    cores: tuple[int, ...] = ()       # () = every core this process may run on
    seed: int = 0
    duty: float = 0.5                 # fraction of the time in bursts
    burst_ms: tuple[float, float] = (5.0, 80.0)   # uniform range of one burst's length
    buffer_mb: int = 32               # streamed in bursts: larger than a last-level cache
    seconds: float = 600.0            # hard deadline after start

    def __post_init__(self) -> None:
        if not 0 < self.duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {self.duty}")
        if not 0 < self.burst_ms[0] <= self.burst_ms[1]:
            raise ValueError(f"burst_ms must be 0 < low <= high, got {self.burst_ms}")
        if self.seconds <= 0 or self.buffer_mb <= 0:
            raise ValueError("seconds and buffer_mb must be > 0")


def _burst(src: np.ndarray, dst: np.ndarray, a: np.ndarray, until: float) -> None:
    while time.monotonic() < until:
        np.copyto(dst, src)           # memory bandwidth and cache pollution
        for _ in range(20):
            a = a @ a                 # the core's own time
            a /= np.abs(a).max() + 1.0


def _run(core: int | None, cfg: NeighbourConfig, index: int, parent: int) -> None:
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (AttributeError, OSError):
            pass  # not Linux: the OS places it
    rng = random.Random(cfg.seed * 1000 + index)
    n = cfg.buffer_mb * 1024 * 1024 // 8
    src = np.random.default_rng(cfg.seed + index).standard_normal(n)
    dst = np.empty_like(src)
    a = np.random.default_rng(index).standard_normal((64, 64))
    deadline = time.monotonic() + cfg.seconds
    while time.monotonic() < deadline and os.getppid() == parent:
        burst = rng.uniform(*cfg.burst_ms) / 1e3
        _burst(src, dst, a, time.monotonic() + burst)
        # Pauses drawn so that bursts take `duty` of the time on average.
        pause = rng.uniform(0, 2 * burst * (1 - cfg.duty) / cfg.duty)
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


@dataclass
class NoisyNeighbour:
    """Starts the load on `__enter__` (or `start()`), stops it on `__exit__` (or `stop()`)."""

    cores: Sequence[int] = ()
    seed: int = 0
    duty: float = 0.5
    seconds: float = 600.0
    config: NeighbourConfig | None = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)

    def _config(self) -> NeighbourConfig:
        if self.config is not None:
            return self.config
        return NeighbourConfig(cores=tuple(self.cores), seed=self.seed, duty=self.duty,
                               seconds=self.seconds)

    def start(self) -> NoisyNeighbour:
        cfg = self._config()
        cores: list[int | None] = list(cfg.cores) or list(_all_cores()) or [None]
        # Separate interpreters: nothing of the caller (threads, locks, __main__) is inherited.
        for i, core in enumerate(cores):
            argv = [sys.executable, "-m", "host.device.noisy_neighbour", "--worker", str(i),
                    "--parent", str(os.getpid()), "--seed", str(cfg.seed),
                    "--duty", str(cfg.duty), "--seconds", str(cfg.seconds),
                    "--burst-ms", f"{cfg.burst_ms[0]},{cfg.burst_ms[1]}",
                    "--buffer-mb", str(cfg.buffer_mb)]
            if core is not None:
                argv += ["--cores", str(core)]
            self._procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.DEVNULL))
        log.info("noisy neighbour on cores %s (duty %.0f%%, seed %d, at most %.0f s)", cores,
                 100 * cfg.duty, cfg.seed, cfg.seconds)
        return self

    def stop(self) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._procs.clear()

    @property
    def running(self) -> bool:
        return any(p.poll() is None for p in self._procs)

    def __enter__(self) -> NoisyNeighbour:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _all_cores() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set()


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m host.device.noisy_neighbour`: the load in the foreground until its deadline."""
    p = argparse.ArgumentParser(prog="python -m host.device.noisy_neighbour", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0,
                   help="stop after this many seconds (default 600)")
    p.add_argument("--cores", default="",
                   help="comma-separated cores to load (default: every core)")
    p.add_argument("--duty", type=float, default=0.5,
                   help="fraction of the time in bursts (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="burst/pause lengths (default 0)")
    p.add_argument("--burst-ms", default="5,80",
                   help="range of one burst's length in ms (default 5,80)")
    p.add_argument("--buffer-mb", type=int, default=32,
                   help="MiB streamed per burst (default 32: more than a last-level cache)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        cores = tuple(int(c) for c in args.cores.split(",") if c.strip())
        low, high = (float(x) for x in args.burst_ms.split(","))
        cfg = NeighbourConfig(cores=cores, seed=args.seed, duty=args.duty, seconds=args.seconds,
                              burst_ms=(low, high), buffer_mb=args.buffer_mb)
    except ValueError as exc:
        p.error(str(exc))
    if args.worker is not None:  # one core's load, started by NoisyNeighbour.start()
        try:
            _run(cores[0] if cores else None, cfg, args.worker, args.parent or os.getppid())
        except KeyboardInterrupt:
            pass
        return 0
    with NoisyNeighbour(config=cfg) as n:
        try:
            while n.running:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
