"""What a proposal saves, measured on the device rather than read from the table.

The latency a proposal saves is the difference between two estimates that share all but a few
units: those of the pruned group and of the layers that read its output. On a small network
that difference is a few microseconds, about as large as the table's noise on each of those
keys; ranking proposals by accuracy lost per millisecond saved then divides by noise (measured
on `make bench-adapt`'s 35% runs: the keys behind the chosen steps had 95% half-widths of
20-30% of the saving, and a second session's table moved those savings by a median of
52-82%). So, for the few proposals that lead the ranking, the units each one changes are timed
again beside the units they replace, in interleaved passes (`host.device.unit_passes`), and a
proposal's saving is the median over passes of the estimate's difference with that pass's
figures put in. A saving is tight when its 95% interval is within `target_halfwidth` of it.
The table itself is left as it is: the saving is for the ranking, and the history keeps it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from device_server.spec import LayerSpec, SessionSpec
from device_server.stats import CONFIDENCE, percentile, quantile_interval
from host.device.client import DeviceClient
from host.device.table_builder import LUT_POLICY
from host.device.unit_passes import UnitPasses, measure_unit_passes
from host.device.whole_model import Figure
from lut.estimator import LatencyEstimator

__all__ = ["SavingsProtocol", "DEFAULT_SAVINGS_PROTOCOL", "changed_units", "measure_savings"]


@dataclass(frozen=True)
class SavingsProtocol:
    """How long to time the changed units of the leading proposals."""

    min_passes: int = 6            # a median's 95% interval needs 6 values to leave (min, max)
    max_passes: int = 20
    target_halfwidth: float = 0.2  # of the saving: tight enough to rank by
    max_seconds: float = 30.0      # per iteration


DEFAULT_SAVINGS_PROTOCOL = SavingsProtocol()


def changed_units(before: Sequence[LayerSpec], after: Sequence[LayerSpec]
                  ) -> tuple[list[LayerSpec], list[LayerSpec]]:
    """(units of `before` that `after` lacks, units of `after` that `before` lacks), counted
    with multiplicity: what a proposal removes and what it puts in their place."""
    b, a = Counter(before), Counter(after)
    return list((b - a).elements()), list((a - b).elements())


def _saving(values: list[float], target: float) -> Figure:
    ordered = sorted(values)
    low, high = quantile_interval(ordered, 0.5, CONFIDENCE)
    value = percentile(ordered, 0.5)
    tight = len(values) >= 2 and (high - low) / 2 <= target * abs(value)
    return Figure(value, low, high, len(values), tight)


def measure_savings(
    estimator: LatencyEstimator,
    client: DeviceClient,
    session: SessionSpec,
    current: Sequence[LayerSpec],
    candidates: Sequence[Sequence[LayerSpec]],
    protocol: SavingsProtocol = DEFAULT_SAVINGS_PROTOCOL,
) -> tuple[list[Figure], UnitPasses]:
    """The estimated latency (ms) each of `candidates` saves over `current`, from their changed
    units timed side by side (module docstring), with 95% intervals.

    Passes go on until every saving is tight or clearly not positive (its interval at or below
    zero), or the protocol's caps.

    Args:
        current: the current network's units.
        candidates: each proposal's network, as units.
    Returns:
        (one saving per candidate, in ms of the table's estimate; the passes measured).
    Raises:
        host.device.results.DeviceError: the device failed a measurement.
    """
    changed = [changed_units(current, c) for c in candidates]
    units = [s for removed, added in changed for s in (*removed, *added)]

    saved: list[list[float]] = [[] for _ in candidates]  # [candidate][pass] ms
    done = [0]  # passes already turned into savings: `settled` is asked after every pass

    def savings(passes: UnitPasses) -> list[Figure]:
        for p in passes.values[done[0]:]:
            now = estimator.estimate(current, overrides=p)
            for s, c in zip(saved, candidates, strict=True):
                s.append(now - estimator.estimate(c, overrides=p))
        done[0] = passes.passes
        return [_saving(s, protocol.target_halfwidth) for s in saved]

    def settled(passes: UnitPasses) -> bool:
        return all(f.tight or f.high <= 0 for f in savings(passes))

    passes = measure_unit_passes(client, units, session, LUT_POLICY, settled,
                                 protocol.min_passes, protocol.max_passes, protocol.max_seconds)
    return savings(passes), passes
