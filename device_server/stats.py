"""A timing as a distribution: summary statistics of per-call samples, and the conditions the
samples were taken under."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["TimingStats", "Conditions", "summarize"]


@dataclass(frozen=True)
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

    @property
    def rel_spread(self) -> float:
        """Half the 10-90 spread relative to the median: a cheap noise figure."""
        return (self.p90_ms - self.min_ms) / self.median_ms if self.median_ms > 0 else 0.0


@dataclass(frozen=True)
class Conditions:
    """What a timing is valid for: a lookup table is tied to exactly these."""

    device_fingerprint: str
    ort_version: str
    provider: str
    intra_op_threads: int
    graph_optimization: str
    provider_options: tuple[tuple[str, str], ...] = field(default=())


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(
    samples_ms: list[float],
    number: int = 1,
    warmup_runs: int = 0,
    session_create_ms: float = 0.0,
    keep_samples: bool = True,
) -> TimingStats:
    """Summary statistics of per-call samples (at least one)."""
    assert samples_ms, "summarize needs at least one sample"
    ordered = sorted(samples_ms)
    return TimingStats(
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        std_ms=statistics.pstdev(ordered) if len(ordered) > 1 else 0.0,
        p90_ms=_percentile(ordered, 0.9),
        min_ms=ordered[0],
        max_ms=ordered[-1],
        samples_count=len(ordered),
        samples_ms=tuple(samples_ms) if keep_samples else (),
        number=number,
        warmup_runs=warmup_runs,
        session_create_ms=session_create_ms,
    )
