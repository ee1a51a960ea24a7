"""Whole networks measured on the device: the ground truth a lookup table is checked against
and the figure every budget decision rests on.

The protocol (README, "The measurement contract"):

- One **round** is one `MeasureModel` call: warm-up, then many short samples; the daemon takes a
  sample again when the OS switched it out, and answers with the 10th percentile of the clean
  samples (`TimingStats.value_ms`) and the other load and steal it saw meanwhile.
- Rounds are **spread in time and interleaved**: every network once per pass, alternating the
  order, so a slow burst or drift of the device hits all of them alike. A round during which
  the hypervisor stole more than `retake_steal` of a core is taken again, not averaged in.
- A network's figure is a **low quantile over rounds** (`PASS_QUANTILE`, the 10th percentile),
  for the reason each round is a low quantile of its samples: interference only adds time, and
  on a shared machine a burst lasts longer than a round (0.1-0.3 s), so whole rounds read
  slow. Its interval runs from the fastest round to the order statistic that bounds the 10th
  percentile from above with 97.5% confidence (distribution-free, binomial): the 3rd fastest
  of 6 rounds, the 5th of 12, the 10th of 48, so a figure is tight only when its fastest
  rounds (half of 6, a fifth of 48) agree. The lower end is a floor, not a bound: below ~30
  rounds the fastest round lies above the 10th percentile more often than 2.5%
  (`interval_coverage`: 45% two-sided at 6 rounds). Decisions lean on the upper end (met); a
  lower end read high can only call a miss, which prunes one step more. Passes go on until
  every interval is narrower than `target_halfwidth` (e.g. +-1.5%), or a caller's decision
  rule is settled, or `max_rounds` / `max_seconds` is hit: then the figure is reported as not
  tight. A decision rule (is the budget met?) may take up to `decision_rounds` passes instead:
  a decision whose interval still straddles its limit is worth a few more seconds of
  measuring, and deciding it on a straddling interval let a run stop just past its budget on a
  noisy machine.
- A **ratio** of two networks (a candidate against the original, for a relative budget) is
  the ratio of their figures, taken from the same interleaved passes, so a drift of the
  device over the passes moves both alike. Its interval runs from the candidate's fastest
  round over the original's upper bound to the candidate's upper bound over the original's
  fastest round, each upper bound one-sided at 98.75%. Until 2026-12 it was the median of the
  per-pass ratios: a burst that slowed one network's round and not the other's moved that
  pass's ratio, and a burst that slowed both compressed it towards 1, and on a shared machine
  its intervals were often tight and wrong (measured: README, "make bench-protocol").
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import CONFIDENCE, TimingStats, percentile, quantile_interval, summarize
from host.device.client import DeviceClient

__all__ = ["WHOLE_MODEL_POLICY", "DEFAULT_PROTOCOL", "PASS_QUANTILE", "WholeModelProtocol",
           "Figure", "Rounds", "measure_networks"]

log = logging.getLogger(__name__)

# One round: >= 10 warm-up calls and 50 ms, then 60 samples of >= 1 ms (~0.1-0.3 s a round).
WHOLE_MODEL_POLICY = MeasurePolicy(warmup_runs=10, min_warmup_ms=50, repeat=60, min_repeat_ms=1)
# Of a network's rounds: its figure (see the module docstring). A table's whole-network rows
# hold this figure, fixed by its schema (lut.store, schema 3): another needs a migration.
PASS_QUANTILE = 0.1
# Each of a ratio's two intervals: their upper bounds one-sided at 98.75% (see the docstring).
_RATIO_SIDE_CONFIDENCE = 1 - (1 - CONFIDENCE) / 2


@dataclass(frozen=True)
class WholeModelProtocol:
    """How many rounds, and how tight (see the module docstring)."""

    policy: MeasurePolicy = WHOLE_MODEL_POLICY
    min_rounds: int = 6              # a figure's upper end is then its 3rd fastest round
    max_rounds: int = 16
    decision_rounds: int = 48        # the cap when a caller's decision rule is not yet settled
    target_halfwidth: float = 0.015  # relative half-width of the interval to stop at
    max_seconds: float = 120.0       # per call of measure_networks
    retake_steal: float = 0.10       # a round with more hypervisor steal is taken again
    max_retakes: int = 6             # per call, over all networks

    def __post_init__(self) -> None:
        if not 1 <= self.min_rounds <= self.max_rounds <= self.decision_rounds:
            raise ValueError("need 1 <= min_rounds <= max_rounds <= decision_rounds")
        if self.target_halfwidth <= 0:
            raise ValueError("target_halfwidth must be > 0")


DEFAULT_PROTOCOL = WholeModelProtocol()


@dataclass(frozen=True)
class Figure:
    """A measured figure with its interval (module docstring): milliseconds, or a ratio of two
    networks."""

    value: float
    low: float
    high: float
    rounds: int
    tight: bool          # the interval met the protocol's target half-width

    @property
    def rel_halfwidth(self) -> float:
        return (self.high - self.low) / 2 / self.value if self.value > 0 else float("inf")

    def describe(self, unit: str = " ms", digits: int = 4) -> str:
        flag = "" if self.tight else ", not tight"
        return (f"{self.value:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"
                f" ({self.rounds} rounds{flag})")

    def to_dict(self) -> dict[str, object]:
        return {"value": self.value, "low": self.low, "high": self.high, "rounds": self.rounds,
                "tight": self.tight}


def _quantile(values: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """(PASS_QUANTILE of `values`, its interval's low, high) at `confidence`."""
    ordered = sorted(values)
    low, high = quantile_interval(ordered, PASS_QUANTILE, confidence)
    return percentile(ordered, PASS_QUANTILE), low, high


def _figure(value: float, low: float, high: float, rounds: int, target: float) -> Figure:
    tight = rounds >= 2 and (high - low) / 2 <= target * value
    return Figure(value, low, high, rounds, tight)


@dataclass
class Rounds:
    """Per-network robust figures, one per pass, aligned across networks (pass p of network a
    was measured seconds apart from pass p of network b)."""

    values: list[list[float]]          # [network][pass] ms
    target_halfwidth: float
    retaken: int = 0
    other_load: float = -1.0           # the highest seen in any round; -1 unknown
    preempted_samples: int = 0
    seconds: float = 0.0

    @property
    def passes(self) -> int:
        return len(self.values[0]) if self.values else 0

    def figure(self, i: int) -> Figure:
        """Network i in ms: the PASS_QUANTILE of its rounds, with its interval."""
        return _figure(*_quantile(self.values[i], CONFIDENCE), len(self.values[i]),
                       self.target_halfwidth)

    def ratio(self, i: int, reference: int) -> Figure:
        """Network i over network `reference` (a speedup is 1 / this): the ratio of their
        figures from the same passes, with the interval both figures' intervals allow."""
        assert len(self.values[i]) == len(self.values[reference]), "passes are aligned"
        a, a_low, a_high = _quantile(self.values[i], _RATIO_SIDE_CONFIDENCE)
        b, b_low, b_high = _quantile(self.values[reference], _RATIO_SIDE_CONFIDENCE)
        return _figure(a / b, a_low / b_high, a_high / b_low, self.passes,
                       self.target_halfwidth)

    def figures(self) -> list[Figure]:
        return [self.figure(i) for i in range(len(self.values))]

    def timing(self, i: int) -> TimingStats:
        """Network i as a stored timing: statistics over its rounds, with the robust figure
        and interval of `figure(i)` (what a LUT's whole-network rows hold)."""
        fig = self.figure(i)
        t = summarize(self.values[i])
        return dataclasses.replace(t, value_ms=fig.value, ci_low_ms=fig.low,
                                   ci_high_ms=fig.high,
                                   preempted_samples=self.preempted_samples,
                                   other_load=self.other_load)


def measure_networks(
    client: DeviceClient,
    blobs: Sequence[bytes],
    session: SessionSpec,
    protocol: WholeModelProtocol = DEFAULT_PROTOCOL,
    settled: Callable[[Rounds], bool] | None = None,
    on_pass: Callable[[int], None] | None = None,
) -> Rounds:
    """Measures every network in interleaved passes until `settled(rounds)` (default: every
    network's interval is tight) after `protocol.min_rounds` passes, or the protocol's caps
    (`max_rounds` passes, or `decision_rounds` when `settled` is given; `max_seconds`).

    Args:
        client: the device.
        blobs: ONNX models (uploaded once each, by hash).
        session: the session options every network is timed under.
        settled: a decision rule, e.g. "the ratio's interval is clear of the budget".
    Returns:
        the rounds; `figure(i)` / `ratio(i, ref)` give the figures with their intervals.
    Raises:
        host.device.client.DeviceError: a measurement failed.
    """
    t0 = time.monotonic()
    shas = [client.upload_model(b) for b in blobs]
    rounds = Rounds([[] for _ in shas], protocol.target_halfwidth)
    done = settled or (lambda r: all(f.tight for f in r.figures()))
    cap = protocol.max_rounds if settled is None else protocol.decision_rounds
    while rounds.passes < cap:
        p = rounds.passes
        order = range(len(shas)) if p % 2 == 0 else reversed(range(len(shas)))
        for i in order:
            while True:
                timing = client.measure_model(shas[i], session, protocol.policy).timing
                rounds.preempted_samples += timing.preempted_samples
                rounds.other_load = max(rounds.other_load, timing.other_load)
                if timing.steal <= protocol.retake_steal or rounds.retaken >= protocol.max_retakes:
                    break
                rounds.retaken += 1
                log.info("round of network %d taken again: hypervisor steal %.2f cores", i,
                         timing.steal)
            rounds.values[i].append(timing.robust_ms)
        if on_pass is not None:
            on_pass(p)
        if rounds.passes >= protocol.min_rounds and (
            done(rounds) or time.monotonic() - t0 > protocol.max_seconds
        ):
            break
    rounds.seconds = time.monotonic() - t0
    return rounds
