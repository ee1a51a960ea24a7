"""Does the table predict what the device measures? Calibration and validation on random pruned
variants of a network.

`calibrate` measures a few whole variants (seeded apart from validation's) and stores them in
the table, so the estimator's correction is fitted on them; `validate` draws other variants,
estimates each from the table (measuring missing units on demand) and measures each whole
network on the device with the whole-network protocol (host/device/whole_model.py: interleaved
rounds until each 95% interval is within the target, or the cap), and reports every variant's
measured interval beside its error.
"""

from __future__ import annotations

import logging
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from device_server.spec import LayerSpec, SessionSpec
from host.device.pool import DevicePool
from host.device.table_builder import (
    LUT_POLICY,
    BuildReport,
    NoiseGuard,
    ensure_overhead,
    measure_into,
)
from host.device.watch import DeviceWatch
from host.device.whole_model import DEFAULT_PROTOCOL, WholeModelProtocol, measure_networks
from host.network import Network, random_config
from lut.calibration import (
    MAX_CALIBRATION_HALFWIDTH,
    MODEL_KIND,
    architecture_of,
    model_row_key,
    parse_model_row_key,
)
from lut.estimator import LatencyEstimator
from lut.keys import shuffled
from lut.store import LutStore

__all__ = ["VariantCheck", "ValidationReport", "OnDemand", "on_demand", "calibrate", "validate",
           "LATE_PASS_REPORTED",
           "CALIBRATION_SEED_OFFSET"]

log = logging.getLogger(__name__)

CALIBRATION_SEED_OFFSET = 1_000_003  # calibration variants never coincide with validation's


ON_DEMAND_NOISE = NoiseGuard(passes=2)  # a few hundred keys: measuring each twice costs seconds
LATE_PASS_REPORTED = 0.05  # a late pass logs how many keys it made faster by more than this


class OnDemand:
    """A fetch callback for the estimator: measures what the table lacks, stores it, returns
    it; and remembers what it measured, so `revisit` can measure those keys once more later.

    Why a later pass: a burst of other work that outlasts a key's two back-to-back passes
    (~15 ms each) leaves a tight but inflated figure. Seen in `make bench-lut`: the smallest
    MobileNetV1 variants estimated 14-32% high in one run, their plain sums 20-27% above the
    same variants' in another run, where they were within 2%.
    """

    def __init__(self, store: LutStore, pool: DevicePool, session: SessionSpec,
                 report: BuildReport | None = None, noise: NoiseGuard = ON_DEMAND_NOISE,
                 watch: DeviceWatch | None = None) -> None:
        self.store, self.pool, self.session = store, pool, session
        self.report, self.noise, self.watch = report, noise, watch
        self.measured: dict[LayerSpec, None] = {}   # every key fetched, in order (a set)
        self.passes = 0

    def __call__(self, specs: Sequence[LayerSpec]) -> dict[LayerSpec, float]:
        got = measure_into(self.store, self.pool, specs, self.session, LUT_POLICY, None,
                           self.report, self.watch, self.noise)
        self.measured.update(dict.fromkeys(got))
        return got

    def revisit(self) -> dict[LayerSpec, tuple[float, float]]:
        """Measures every key fetched so far once more, in a new order, and keeps the faster
        robust figure of the stored and the new one.

        Returns:
            {key: (ms before, ms after)} for the keys the late pass made faster.
        """
        self.passes += 1
        known = {s: t for s in self.measured if (t := self.store.get(s)) is not None}
        after = measure_into(self.store, self.pool, shuffled(known, seed=self.passes),
                             self.session, LUT_POLICY, None, self.report, self.watch,
                             NoiseGuard(passes=1), known)
        moved = {s: (t.robust_ms, after[s]) for s, t in known.items()
                 if s in after and after[s] < t.robust_ms}
        big = much_faster(moved)
        log.info("late pass: %d keys measured again, %d faster by more than %.0f%% (at most "
                 "%.2fx)", len(known), len(big), 100 * LATE_PASS_REPORTED, max(big, default=1.0))
        return moved


def much_faster(moved: dict[LayerSpec, tuple[float, float]]) -> list[float]:
    """before/after of the keys a late pass made faster by more than LATE_PASS_REPORTED."""
    return [b / a for b, a in moved.values() if b > a * (1 + LATE_PASS_REPORTED)]


def on_demand(store: LutStore, pool: DevicePool, session: SessionSpec,
              report: BuildReport | None = None, noise: NoiseGuard = ON_DEMAND_NOISE,
              watch: DeviceWatch | None = None) -> OnDemand:
    """A fetch callback for the estimator (see `OnDemand`). With `watch`, the device state of
    every measurement is checked (warnings are logged)."""
    return OnDemand(store, pool, session, report, noise, watch)


def calibrate(store: LutStore, pool: DevicePool, network: Network, session: SessionSpec,
              count: int = 10, seed: int = 0, step: int = 8,
              protocol: WholeModelProtocol = DEFAULT_PROTOCOL,
              max_halfwidth: float = MAX_CALIBRATION_HALFWIDTH) -> int:
    """Ensures the table holds `count` whole-network measurements of this architecture.

    A network whose interval is wider than `max_halfwidth` (relative) is measured once
    more and the tighter figure kept. Returns how many networks were measured now.
    """
    arch = architecture_of(network.specs())
    have = sum(1 for r in store.all_rows(kind=MODEL_KIND)
               if architecture_of(parse_model_row_key(r.key)) == arch)
    need = count - have
    if need <= 0:
        return 0
    rng = random.Random(seed + CALIBRATION_SEED_OFFSET + have)
    # Keep fractions spread evenly over [0.15, 1], so the fit spans every size the engine
    # (and validation) will ask about rather than extrapolating; the unpruned network first.
    fractions = [0.15 + 0.85 * i / max(1, need - 1) for i in range(need)]
    configs = []
    if have == 0:
        configs.append(network.full_config())
        fractions.pop()
    seen = {model_row_key(network.specs(c)) for c in configs} | {
        r.key for r in store.all_rows(kind=MODEL_KIND)}
    for i in range(len(fractions) * 20):  # small networks have few distinct variants
        if len(configs) == need:
            break
        config = random_config(network.groups, rng, step, keep=fractions[i % len(fractions)])
        key = model_row_key(network.specs(config))
        if key not in seen:
            seen.add(key)
            configs.append(config)
    blobs = [network.onnx(c) for c in configs]
    rounds = measure_networks(pool.clients[0], blobs, session, protocol)
    timings = [rounds.timing(i) for i in range(len(configs))]
    # A figure too wide to fit on is measured once more, not given up: the fit would refuse it
    # and, with too few left, fall back to a plain sum. The tighter of the two is kept.
    wide = [i for i in range(len(configs))
            if rounds.figure(i).rel_halfwidth > max_halfwidth]
    if wide:
        log.info("calibration: %d of %d whole networks wider than +-%.0f%%: measuring them "
                 "again", len(wide), len(configs), 100 * max_halfwidth)
        again = measure_networks(pool.clients[0], [blobs[i] for i in wide], session, protocol)
        for j, i in enumerate(wide):
            if again.figure(j).rel_halfwidth < rounds.figure(i).rel_halfwidth:
                timings[i] = again.timing(j)
    for config, timing in zip(configs, timings, strict=True):
        store.put(model_row_key(network.specs(config)), timing, kind=MODEL_KIND)
    log.info("calibration: measured %d whole networks", len(configs))
    return len(configs)


@dataclass(frozen=True)
class VariantCheck:
    config: dict[int, int]
    estimated_ms: float
    naive_ms: float            # plain sum of standalone units, no overhead or correction
    measured_ms: float         # whole network on the device: its figure over rounds
    measured_low_ms: float     # its interval (host/device/whole_model.py)
    measured_high_ms: float
    rounds: int
    tight: bool                # the interval met the protocol's target
    # Against the unpruned network measured in the same interleaved rounds (the engine's relative
    # budget): the device's drift between the table's keys and this pass cancels in a ratio.
    estimated_ratio: float = float("nan")
    measured_ratio: float = float("nan")
    measured_ratio_low: float = float("nan")
    measured_ratio_high: float = float("nan")
    # The estimate before the late pass measured this run's keys again (see `OnDemand`).
    first_estimated_ms: float = float("nan")

    @property
    def measured_halfwidth(self) -> float:
        """Half the measured interval relative to the measured figure."""
        return (self.measured_high_ms - self.measured_low_ms) / 2 / self.measured_ms

    @property
    def rel_error(self) -> float:
        return (self.estimated_ms - self.measured_ms) / self.measured_ms

    @property
    def first_rel_error(self) -> float:
        """`rel_error` of the estimate before the late pass."""
        return (self.first_estimated_ms - self.measured_ms) / self.measured_ms

    @property
    def naive_rel_error(self) -> float:
        return (self.naive_ms - self.measured_ms) / self.measured_ms

    @property
    def ratio_rel_error(self) -> float:
        """Error of the estimated fraction of the unpruned network's latency."""
        return (self.estimated_ratio - self.measured_ratio) / self.measured_ratio

    def to_dict(self) -> dict[str, object]:
        return {"config": {str(k): v for k, v in sorted(self.config.items())},
                "estimated_ms": self.estimated_ms, "naive_ms": self.naive_ms,
                "measured_ms": self.measured_ms, "measured_low_ms": self.measured_low_ms,
                "measured_high_ms": self.measured_high_ms, "rounds": self.rounds,
                "tight": self.tight, "measured_halfwidth": self.measured_halfwidth,
                "rel_error": self.rel_error, "naive_rel_error": self.naive_rel_error,
                "estimated_ratio": self.estimated_ratio, "measured_ratio": self.measured_ratio,
                "measured_ratio_low": self.measured_ratio_low,
                "measured_ratio_high": self.measured_ratio_high,
                "ratio_rel_error": self.ratio_rel_error,
                "first_estimated_ms": self.first_estimated_ms,
                "first_rel_error": self.first_rel_error}


@dataclass
class ValidationReport:
    network: str
    rows: list[VariantCheck] = field(default_factory=list)
    calibration_samples: int = 0
    keys_fetched: int = 0
    seconds: float = 0.0
    reference_ms: float = float("nan")   # the unpruned network, measured with the variants
    keys_revisited: int = 0                # measured again by the late pass
    keys_faster: int = 0                   # ... and found faster by more than LATE_PASS_REPORTED

    @property
    def median_abs_ratio_error(self) -> float:
        return statistics.median(abs(r.ratio_rel_error) for r in self.rows)

    @property
    def max_abs_ratio_error(self) -> float:
        return max(abs(r.ratio_rel_error) for r in self.rows)

    @property
    def median_abs_rel_error(self) -> float:
        return statistics.median(abs(r.rel_error) for r in self.rows)

    @property
    def max_abs_rel_error(self) -> float:
        return max(abs(r.rel_error) for r in self.rows)

    @property
    def first_median_abs_rel_error(self) -> float:
        """Before the late pass."""
        return statistics.median(abs(r.first_rel_error) for r in self.rows)

    @property
    def first_max_abs_rel_error(self) -> float:
        return max(abs(r.first_rel_error) for r in self.rows)

    @property
    def naive_median_abs_rel_error(self) -> float:
        return statistics.median(abs(r.naive_rel_error) for r in self.rows)

    @property
    def naive_max_abs_rel_error(self) -> float:
        return max(abs(r.naive_rel_error) for r in self.rows)

    def to_dict(self) -> dict[str, object]:
        return {
            "network": self.network,
            "variants": len(self.rows),
            "median_abs_rel_error": self.median_abs_rel_error,
            "max_abs_rel_error": self.max_abs_rel_error,
            "naive_median_abs_rel_error": self.naive_median_abs_rel_error,
            "naive_max_abs_rel_error": self.naive_max_abs_rel_error,
            "median_abs_ratio_error": self.median_abs_ratio_error,
            "max_abs_ratio_error": self.max_abs_ratio_error,
            "reference_ms": self.reference_ms,
            "first_median_abs_rel_error": self.first_median_abs_rel_error,
            "first_max_abs_rel_error": self.first_max_abs_rel_error,
            "keys_revisited": self.keys_revisited,
            "keys_faster": self.keys_faster,
            "calibration_samples": self.calibration_samples,
            "keys_fetched": self.keys_fetched,
            "seconds": self.seconds,
            "rows": [r.to_dict() for r in self.rows],
        }


def validate(store: LutStore, pool: DevicePool, network: Network, session: SessionSpec,
             variants: int = 20, seed: int = 0, step: int = 8,
             calibration: int = 10,
             protocol: WholeModelProtocol = DEFAULT_PROTOCOL) -> ValidationReport:
    """Estimates vs whole-network measurements for `variants` random pruned variants.

    Each variant is compared twice: its estimated milliseconds against its measured figure
    (`rel_error`), and its estimated fraction of the unpruned network against the fraction
    measured in the same interleaved rounds (`ratio_rel_error`; what a relative budget rests
    on). The second is blind to a device that drifted between the table's keys and this pass.
    Every key measured for it is measured once more after all variants were estimated (see
    `OnDemand.revisit`); the errors are of the table after that pass, and each variant's
    estimate before it is reported beside (`first_estimated_ms`).
    """
    t0 = time.monotonic()
    build = BuildReport()
    fetch = on_demand(store, pool, session, build)
    ensure_overhead(store, pool, session)
    calibrate(store, pool, network, session, calibration, seed, step, protocol)
    arch = architecture_of(network.specs())
    estimator = LatencyEstimator.from_store(store, fetch=fetch, architecture=arch)
    rng = random.Random(seed)
    configs = [random_config(network.groups, rng, step) for _ in range(variants)]
    # The unpruned network goes first, as the reference every variant's ratio is taken against.
    blobs = [network.onnx()] + [network.onnx(c) for c in configs]
    rounds = measure_networks(pool.clients[0], blobs, session, protocol)
    estimator.estimate(network.specs())  # fetches the reference's keys, if the table lacks them
    first = [estimator.estimate(network.specs(c)) for c in configs]  # ... and the variants'
    # The late pass: every key this run measured, once more, minutes after its first two.
    moved = fetch.revisit()
    estimator = LatencyEstimator.from_store(store, fetch=fetch, architecture=arch)  # refit
    reference_estimate = estimator.estimate(network.specs())
    report = ValidationReport(network.name,
                              calibration_samples=estimator.correction.samples,
                              reference_ms=rounds.figure(0).value,
                              keys_revisited=len(fetch.measured),
                              keys_faster=len(much_faster(moved)))
    for i, config in enumerate(configs, start=1):
        fig, ratio = rounds.figure(i), rounds.ratio(i, 0)
        specs = network.specs(config)
        estimated = estimator.estimate(specs)
        report.rows.append(VariantCheck(
            config=config,
            estimated_ms=estimated,
            naive_ms=estimator.raw_sum(specs),
            measured_ms=fig.value,
            measured_low_ms=fig.low,
            measured_high_ms=fig.high,
            rounds=fig.rounds,
            tight=fig.tight,
            estimated_ratio=estimated / reference_estimate,
            measured_ratio=ratio.value,
            measured_ratio_low=ratio.low,
            measured_ratio_high=ratio.high,
            first_estimated_ms=first[i - 1],
        ))
    report.keys_fetched = build.measured
    report.seconds = time.monotonic() - t0
    return report
