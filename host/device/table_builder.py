"""Filling a lookup table from a device pool: resume, shuffle, stream, store, guard drift.

Only keys the table lacks are measured (resume is free). They go out in a seeded random order
(thermal drift then spreads over all layers instead of biasing one) in windows; each row is
committed the moment it arrives, so a killed build loses at most the measurements in flight.
After each window a fixed reference layer is re-measured on every device: if it moved more than
`drift_threshold` from its first value (throttling, another load), the build warns and measures
that window again once. The device state that comes back with every measurement is watched too
(`DeviceWatch`: heat, clock throttling, other load, charger); with `DriftGuard.cooldown_s` the
build pauses, before re-measuring, until the device is cool and the reference back in line.
A key whose own samples spread too far is measured again and the tightest measurement kept
(`NoiseGuard`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from device_server.stats import TimingStats
from host.device.client import DeviceInfo, MeasureFailure, Measurement
from host.device.pool import DevicePool, DeviceStats
from host.device.watch import DeviceWatch
from lut.estimator import OVERHEAD_KEY, OVERHEAD_KIND
from lut.keys import shuffled
from lut.store import LutIdentity, LutStore

__all__ = ["BuildReport", "DriftGuard", "NoiseGuard", "LUT_POLICY", "REFERENCE_SPEC", "build_table",
           "identity_for", "measure_into"]

log = logging.getLogger(__name__)

# Per key: >= 2 warm-up calls and 2 ms, then 15 samples of >= 0.5 ms each (~10 ms of device
# time plus session creation, as the 5 samples of 1.5 ms before the robust protocol): many short
# samples give the 10th percentile something to choose from, and a preempted one is taken
# again. Cheap enough for ~22,000 keys in minutes (see `make bench-lut`).
LUT_POLICY = MeasurePolicy(warmup_runs=2, min_warmup_ms=2.0, repeat=15, min_repeat_ms=0.5)
REFERENCE_SPEC = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=32, kernel=3, padding=1,
                                  batch_norm=True, activation="relu")
REFERENCE_KIND = "reference"


class ProgressSink(Protocol):
    """Where a build reports progress (structural: the host's `host.progress.Progress`)."""

    def bar(self, total: int, desc: str, unit: str = ...) -> Any: ...


def identity_for(info: DeviceInfo, session: SessionSpec, batch_size: int = 1) -> LutIdentity:
    """The conditions a table built on this device with this session belongs to."""
    conditions = session.with_threads(info.default_threads).conditions(
        fingerprint=info.fingerprint, ort_version=info.ort_version,
        pinned_cpus=info.confined_to)
    return LutIdentity(conditions=conditions, batch_size=batch_size)


@dataclass(frozen=True)
class DriftGuard:
    window: int = 500               # keys between reference checks
    threshold: float = 0.10         # relative move of the reference median that counts
    policy: MeasurePolicy = MeasurePolicy(warmup_runs=5, min_warmup_ms=20, repeat=15,
                                          min_repeat_ms=5)
    cooldown_s: float = 0.0         # > 0: on drift or heat, pause up to this long before going on
    poll_s: float = 10.0            # how often a cool-down re-reads the device


@dataclass
class BuildReport:
    planned: int = 0                # distinct keys asked for
    present: int = 0                # already in the table (resumed)
    measured: int = 0               # rows written by this build (re-measures included)
    failed: list[MeasureFailure] = field(default_factory=list)
    drift_events: list[str] = field(default_factory=list)
    remeasured_windows: int = 0
    requeued: int = 0
    seconds: float = 0.0
    state_warnings: list[str] = field(default_factory=list)  # from the devices' own readings
    cooldowns: list[float] = field(default_factory=list)     # seconds paused, per cool-down
    remeasured: int = 0             # extra measurements of keys (noise, extra passes)
    devices: list[DeviceStats] = field(default_factory=list)


@dataclass(frozen=True)
class NoiseGuard:
    """What to do about load that the device's other work adds to a timing (it only ever adds).

    A key whose samples spread beyond `max_spread` (max/min) was hit mid-measurement: it is
    measured again, up to `retries` times. A burst that lasts a whole measurement leaves a tight
    but inflated timing that no spread reveals: `passes` > 1 measures every key again later, in
    another order. Of all measurements of a key, the fastest robust figure (`robust_ms`: the 10th
    percentile of the samples the daemon did not see preempted) is kept. Seen here: ~4% of a
    full MobileNetV1 table spread over 1.3x, single keys stored at up to 10x their re-measured
    time, and tight keys 30-70% slow in a burst; on a small network one such key moves the
    estimate by tens of percent.
    """

    max_spread: float = 1.3
    retries: int = 2
    passes: int = 1


def _spread(t: TimingStats) -> float:
    return t.max_ms / t.min_ms if t.min_ms > 0 else float("inf")


def measure_into(
    store: LutStore,
    pool: DevicePool,
    specs: Sequence[LayerSpec],
    session: SessionSpec,
    policy: MeasurePolicy,
    on_row: Callable[[], None] | None = None,
    report: BuildReport | None = None,
    watch: DeviceWatch | None = None,
    noise: NoiseGuard = NoiseGuard(),
    known: Mapping[LayerSpec, TimingStats] | None = None,
) -> dict[LayerSpec, float]:
    """Measures `specs` on the pool and commits each row as it arrives; returns the medians.
    Noisy keys are measured again afterwards, and every key `noise.passes` times in all.

    `known`: timings already stored for some of `specs` (a later pass over them): a key's row
    is replaced only by a faster robust figure, NoiseGuard's rule across passes."""
    kept: dict[LayerSpec, TimingStats] = dict(known or {})
    rep = report if report is not None else BuildReport()

    def on_result(result: Measurement | MeasureFailure) -> None:
        if isinstance(result, Measurement):
            assert result.spec is not None
            before = kept.get(result.spec)
            if before is None or result.timing.robust_ms < before.robust_ms:
                store.put(result.spec, result.timing)
                kept[result.spec] = result.timing
            if before is None:
                rep.measured += 1
            else:
                rep.remeasured += 1
            if watch is not None:
                rep.state_warnings.extend(watch.observe(result.state))
        else:
            rep.failed.append(result)
            log.warning("could not measure %s: %s %s", result.spec.describe(), result.code,
                        result.message)

    def first(result: Measurement | MeasureFailure) -> None:
        on_result(result)
        if on_row is not None:
            on_row()

    def run(todo: list[LayerSpec], callback: Callable[[Measurement | MeasureFailure], None]
            ) -> None:
        pool_report = pool.measure(todo, session, policy, callback)
        rep.requeued += pool_report.requeued
        _merge_device_stats(rep, pool_report.devices)

    for n in range(max(1, noise.passes)):
        todo = list(specs) if n == 0 else shuffled([s for s in specs if s in kept], n)
        run(todo, first if n == 0 else on_result)
        for _ in range(noise.retries):
            todo = [s for s in todo if s in kept and _spread(kept[s]) > noise.max_spread]
            if not todo:
                break
            log.info("%d keys measured with samples spread over %.1fx: measuring them again",
                     len(todo), noise.max_spread)
            run(todo, on_result)
    return {spec: timing.robust_ms for spec, timing in kept.items()}


def _merge_device_stats(report: BuildReport, stats: list[DeviceStats]) -> None:
    by_address = {d.address: d for d in report.devices}
    for s in stats:
        mine = by_address.get(s.address)
        if mine is None:
            mine = DeviceStats(s.address)
            report.devices.append(mine)
            by_address[s.address] = mine
        mine.measured += s.measured
        mine.failed += s.failed
        mine.busy_s += s.busy_s
        mine.lost = mine.lost or s.lost


def ensure_overhead(store: LutStore, pool: DevicePool, session: SessionSpec) -> float:
    """The table's per-call overhead row, measured once."""
    row = store.get(OVERHEAD_KEY, kind=OVERHEAD_KIND)
    if row is None:
        timing = pool.clients[0].overhead(session, DriftGuard().policy)
        store.put(OVERHEAD_KEY, timing, kind=OVERHEAD_KIND)
        return timing.robust_ms
    return row.robust_ms


def _reference(pool: DevicePool, session: SessionSpec, policy: MeasurePolicy) -> list[float]:
    return [c.measure(REFERENCE_SPEC, session, policy).timing.robust_ms for c in pool.clients]


def build_table(
    store: LutStore,
    pool: DevicePool,
    specs: Sequence[LayerSpec],
    session: SessionSpec,
    policy: MeasurePolicy = LUT_POLICY,
    seed: int = 0,
    drift: DriftGuard | None = None,
    progress: bool | ProgressSink = True,
    watch: DeviceWatch | None = None,
    noise: NoiseGuard = NoiseGuard(),
) -> BuildReport:
    """Measures every spec the table lacks. Interrupting it keeps every committed row.

    `progress`: True for a tqdm bar, False for none, or a sink whose `bar(total, desc, unit)`
    decides (the host's `Progress`: a bar on a terminal, a line every few seconds with keys/s
    and the time left elsewhere).
    """
    from tqdm import tqdm  # host dependency; imported here so `import lut` stays light

    t0 = time.monotonic()
    distinct = list(dict.fromkeys(specs))
    missing_keys = set(store.missing([s.key() for s in distinct]))
    todo = shuffled([s for s in distinct if s.key() in missing_keys], seed)
    report = BuildReport(planned=len(distinct), present=len(distinct) - len(todo))
    ensure_overhead(store, pool, session)
    guard = drift or DriftGuard()
    watch = watch or DeviceWatch.for_session(session, pool.info.default_threads)
    if isinstance(progress, bool):
        bar = tqdm(total=len(todo), unit="key", disable=not progress, dynamic_ncols=True,
                   desc="measuring")
    else:
        bar = progress.bar(len(todo), "lut build", "key")
    try:
        baseline = _reference(pool, session, guard.policy) if todo else []
        for start in range(0, len(todo), guard.window):
            window = todo[start:start + guard.window]
            measure_into(store, pool, window, session, policy, bar.update, report, watch,
                         noise)
            moved = _drift(baseline, _reference(pool, session, guard.policy))
            if guard.cooldown_s > 0 and (moved > guard.threshold or _any_hot(pool, watch)):
                report.cooldowns.append(_cool_down(pool, session, guard, baseline, watch))
            if moved > guard.threshold:
                msg = (f"reference layer moved {moved:+.0%} during keys {start}-"
                       f"{start + len(window)}: re-measuring that window")
                log.warning(msg)
                report.drift_events.append(msg)
                report.remeasured_windows += 1
                measure_into(store, pool, window, session, policy, None, report, watch,
                             noise)
                after = _drift(baseline, _reference(pool, session, guard.policy))
                if after > guard.threshold:
                    msg = (f"reference still {after:+.0%} off after re-measuring: the device "
                           f"is throttled or loaded; let it cool down and re-run the build")
                    log.warning(msg)
                    report.drift_events.append(msg)
    finally:
        bar.close()
        report.seconds = time.monotonic() - t0
    return report


def _any_hot(pool: DevicePool, watch: DeviceWatch) -> bool:
    return any(watch.is_hot(c.device_info().state) for c in pool.clients)


def _cool_down(pool: DevicePool, session: SessionSpec, guard: DriftGuard,
               baseline: list[float], watch: DeviceWatch,
               sleep: Callable[[float], None] = time.sleep) -> float:
    """Waits (up to `guard.cooldown_s`) until no device is hot and the reference is back within
    the threshold; returns the seconds waited."""
    t0 = time.monotonic()
    log.warning("pausing up to %.0f s for the device to cool down", guard.cooldown_s)
    while (left := guard.cooldown_s - (time.monotonic() - t0)) > 0:
        sleep(min(guard.poll_s, left))
        if not _any_hot(pool, watch) and _drift(baseline, _reference(pool, session, guard.policy)) \
                <= guard.threshold:
            break
    waited = time.monotonic() - t0
    log.info("cool-down: resumed after %.0f s", waited)
    return waited


def _drift(baseline: list[float], now: list[float]) -> float:
    """The largest relative move of any device's reference median."""
    return max((abs(n / b - 1) for b, n in zip(baseline, now, strict=True) if b > 0),
               default=0.0)
