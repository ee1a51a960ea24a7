"""A timing as a distribution: summary statistics of per-call samples, the robust figure the
project acts on with its confidence interval, and the conditions the samples were taken under.

The robust figure (`value_ms`) is a low quantile (`ROBUST_QUANTILE`, the 10th percentile) of
the samples the daemon did not see preempted. Interference on a shared device only ever adds
time (Chen & Revels, "Robust benchmarking in noisy environments", 2016), so the bottom of the
distribution is what repeats; the minimum itself is one lucky sample, the 10th percentile is
nearly as stable (measured in the README) and is not moved by a single outlier. Its interval
is distribution-free: the order statistics that bracket the quantile with >= 95% binomial
confidence.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["TimingStats", "Conditions", "summarize", "percentile", "quantile_interval",
           "median_interval", "interval_coverage",
           "ROBUST_QUANTILE", "CONFIDENCE"]

ROBUST_QUANTILE = 0.1   # the quantile of the samples reported as `value_ms`
CONFIDENCE = 0.95       # of every interval reported


@dataclass(frozen=True, kw_only=True)
class TimingStats:
    """Per-call latency distribution (milliseconds) of one measured configuration."""

    median_ms: float
    mean_ms: float
    std_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    samples_count: int
    samples_ms: tuple[float, ...] = ()
    number: int = 1                 # back-to-back calls per sample
    warmup_runs: int = 0
    session_create_ms: float = 0.0  # 0 when the session came from the cache
    # The robust figure: ROBUST_QUANTILE of the clean samples, and its CONFIDENCE interval.
    # 0 in timings from daemons older than the protocol (then `robust_ms` falls back to median).
    value_ms: float = 0.0
    ci_low_ms: float = 0.0
    ci_high_ms: float = 0.0
    preempted_samples: int = 0      # samples taken again: the OS switched the timer out mid-sample
    other_load: float = -1.0        # cores busy with other work during the samples; -1 unknown
    steal: float = -1.0             # fraction of a core the hypervisor took away; -1 unknown

    @property
    def robust_ms(self) -> float:
        """`value_ms`, or the median for a timing made without the robust protocol."""
        return self.value_ms if self.value_ms > 0 else self.median_ms

    @property
    def rel_halfwidth(self) -> float:
        """Half the confidence interval relative to the robust figure (inf when unknown)."""
        if self.value_ms <= 0 or self.ci_high_ms <= 0:
            return float("inf")
        return (self.ci_high_ms - self.ci_low_ms) / 2 / self.value_ms

    @property
    def rel_spread(self) -> float:
        """Half the 10-90 spread relative to the median: a cheap noise figure."""
        return (self.p90_ms - self.min_ms) / self.median_ms if self.median_ms > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class Conditions:
    """What a timing is valid for: a lookup table is tied to exactly these."""

    device_fingerprint: str
    ort_version: str
    provider: str
    intra_op_threads: int
    graph_optimization: str
    provider_options: tuple[tuple[str, str], ...] = field(default=())
    # The cores the daemon is confined to (`serve --cpus`); () when it may run on every core.
    # On a big.LITTLE phone the same layer differs several-fold between clusters.
    pinned_cpus: tuple[int, ...] = field(default=())


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _binom_cdfs(n: int, p: float) -> list[float]:
    """[P(X <= k) for k in 0..n] for X ~ Binomial(n, p), in one pass."""
    total = 0.0
    out = []
    for i in range(n + 1):
        total += math.comb(n, i) * p**i * (1 - p) ** (n - i)
        out.append(total)
    return out


def quantile_interval(
    sorted_values: list[float], q: float, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Distribution-free interval for the q-quantile: order statistics x(l) <= x(u) with
    P(x(l) <= ξ_q <= x(u)) >= `confidence` (binomial; e.g. Hahn & Meeker, Statistical
    Intervals, §5.2), as symmetric in tail probability as the sample size allows.
    Too few values for that confidence clip the interval to (min, max): its real confidence is
    then `interval_coverage(n, q)`.

    Args:
        sorted_values: at least one value, ascending.
        q: the quantile, in (0, 1).
    Returns:
        (low, high) in the values' unit.
    """
    n = len(sorted_values)
    assert n >= 1 and 0 < q < 1, "quantile_interval needs values and 0 < q < 1"
    lo_rank, hi_rank = _ranks(n, q, confidence)
    return sorted_values[lo_rank - 1], sorted_values[hi_rank - 1]


def _ranks(n: int, q: float, confidence: float) -> tuple[int, int]:
    """1-based ranks (l, u) of the interval; clipped to (1, n) when n is too small."""
    alpha = (1 - confidence) / 2
    cdf = _binom_cdfs(n, q)  # cdf[k] = P(B <= k), B ~ Binomial(n, q)
    # l: the largest rank with P(B <= l-1) <= alpha; u: the smallest with P(B >= u) <= alpha.
    lo_rank = 1
    for r in range(1, n + 1):
        if cdf[r - 1] > alpha:
            break
        lo_rank = r
    hi_rank = n
    for r in range(n, 0, -1):
        if 1 - cdf[r - 1] > alpha:
            break
        hi_rank = r
    return lo_rank, hi_rank


def interval_coverage(n: int, q: float, confidence: float = CONFIDENCE) -> float:
    """The confidence `quantile_interval` actually reaches with n values: `confidence` when n
    is large enough, less when the interval had to be clipped to (min, max) — e.g. 79% for the
    10th percentile of 15 samples, 94% for the median of 5 rounds."""
    lo_rank, hi_rank = _ranks(n, q, confidence)
    cdf = _binom_cdfs(n, q)
    return cdf[hi_rank - 1] - cdf[lo_rank - 1]  # P(l <= B <= u - 1)


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Distribution-free `confidence` interval of the median of `values` (see
    `quantile_interval`); needs >= 6 values for 95% (5 give 94%, reported as min..max)."""
    return quantile_interval(sorted(values), 0.5, confidence)


def summarize(
    samples_ms: list[float],
    number: int = 1,
    warmup_runs: int = 0,
    session_create_ms: float = 0.0,
    keep_samples: bool = True,
    preempted_samples: int = 0,
    other_load: float = -1.0,
    steal: float = -1.0,
) -> TimingStats:
    """Summary statistics of per-call samples (at least one, in ms), with the robust figure
    (ROBUST_QUANTILE) and its interval."""
    assert samples_ms, "summarize needs at least one sample"
    ordered = sorted(samples_ms)
    low, high = quantile_interval(ordered, ROBUST_QUANTILE)
    return TimingStats(
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        std_ms=statistics.pstdev(ordered) if len(ordered) > 1 else 0.0,
        p90_ms=percentile(ordered, 0.9),
        min_ms=ordered[0],
        max_ms=ordered[-1],
        samples_count=len(ordered),
        samples_ms=tuple(samples_ms) if keep_samples else (),
        number=number,
        warmup_runs=warmup_runs,
        session_create_ms=session_create_ms,
        value_ms=percentile(ordered, ROBUST_QUANTILE),
        ci_low_ms=low,
        ci_high_ms=high,
        preempted_samples=preempted_samples,
        other_load=other_load,
        steal=steal,
    )
