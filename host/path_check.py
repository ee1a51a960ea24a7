"""A table's estimates checked where an optimiser takes them: NetAdapt descents, untrained.

Random variants (`host.lut_validation.validate`) test a table where its calibration networks
lie: pruned near uniformly. The engine goes elsewhere. Each iteration it removes filters where
the estimate says they save most, so it exploits whatever the estimate attributes wrongly and
ends on the networks the table estimates worst. Seen 2026-12-01: a correction with a weights
term (lut/calibration.py) predicted random MobileNetV1 variants well and the final network of
`make run` 41% low.

A descent follows the engine's proposal rule (Yang et al., ECCV 2018, Sec. 3.2; here
`host.engine.proposals.choose_proposals`, with the engine's defaults for the schedule and the
cap): each iteration, for every group the fewest filters whose removal cuts the estimate by the
reduction target (initial reduction x the original's estimate x decay^i, clipped to what is
left, as the engine clips it), or a partial step of at most `max_cut` of the group, until the
estimate is at `fraction` of the original's. No training: each iteration takes one of the
proposals at random (seeded), as accuracy picks one the table cannot foresee. Descents driven
by each correction of one table (every unit figure shared, so only the corrections differ) are
then measured in one interleaved pass with the unpruned network.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from device_server.spec import LayerSpec, SessionSpec
from host.device.pool import DevicePool
from host.device.whole_model import DEFAULT_PROTOCOL, WholeModelProtocol, measure_networks
from host.engine.config import AdaptConfig, Budget
from host.engine.proposals import choose_proposals
from host.network import ChannelConfig, Network
from lut.calibration import Correction
from lut.estimator import LatencyEstimator

__all__ = ["Descent", "PathCheck", "descend", "check_paths", "estimate_with", "order_agreement"]

Estimate = Callable[[Sequence[LayerSpec]], float]
_ENGINE = AdaptConfig(Budget(fraction=0.5))  # its defaults: the schedule and the cap


@dataclass(frozen=True)
class Descent:
    config: ChannelConfig
    iterations: int
    estimated_ms: float    # by the estimator that drove it
    reached: bool          # its estimate got to `fraction` of the original's


@dataclass(frozen=True)
class PathCheck:
    """One descent's final network: every estimator's figure beside the measured one."""

    driven_by: str                    # the name of the correction that chose the path
    seed: int
    descent: Descent
    estimated_ms: dict[str, float] = field(default_factory=dict)  # by correction name
    measured_ms: float = 0.0          # the whole network's robust figure on the device
    measured_low_ms: float = 0.0      # its 95% interval (host/device/whole_model.py)
    measured_high_ms: float = 0.0
    tight: bool = False
    measured_ratio: float = 0.0       # to the unpruned network, in the same rounds

    @property
    def rel_halfwidth(self) -> float:
        """Of the measured figure's interval."""
        return (self.measured_high_ms - self.measured_low_ms) / 2 / self.measured_ms

    def rel_error(self, correction: str) -> float:
        """(estimate - measured) / measured, signed: < 0 is an under-estimate."""
        return self.estimated_ms[correction] / self.measured_ms - 1


def estimate_with(estimator: LatencyEstimator, correction: Correction) -> Estimate:
    """`estimator`'s unit figures (fetching what it lacks) under another correction."""
    return lambda specs: estimator.estimate(specs, correction)


def descend(network: Network, estimate: Estimate, fraction: float = 0.5, seed: int = 0,
            step: int = _ENGINE.step, initial_reduction: float = _ENGINE.initial_reduction,
            decay: float = _ENGINE.decay, max_cut: float = _ENGINE.max_cut,
            max_iterations: int = _ENGINE.max_iterations) -> Descent:
    """A greedy NetAdapt descent on `estimate` (module docstring) from the unpruned network;
    the schedule and cap default to the engine's (`host.engine.config.AdaptConfig`).

    Args:
        estimate: milliseconds of a network's unit specs, e.g. `LatencyEstimator.estimate`.
        fraction: where it stops, of the original's estimate, in (0, 1).
        seed: picks among each iteration's proposals.
    Raises:
        ValueError: `fraction` outside (0, 1), or `max_cut` outside (0, 1].
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if not 0 < max_cut <= 1:
        raise ValueError(f"max_cut must be in (0, 1], got {max_cut}")
    rng = random.Random(seed)
    config = network.full_config()
    original = current = estimate(network.specs(config))
    goal = fraction * original
    iterations = 0
    while current > goal and iterations < max_iterations:
        target = min(initial_reduction * original * decay ** iterations, current - goal)
        proposals = choose_proposals(network.groups, config, network.specs, estimate, target,
                                     step, max_cut)
        if not proposals:
            break
        config = dict(rng.choice(proposals).config)
        current = estimate(network.specs(config))
        iterations += 1
    return Descent(config, iterations, current, current <= goal)


def check_paths(pool: DevicePool, network: Network, session: SessionSpec,
                estimator: LatencyEstimator, corrections: Mapping[str, Correction],
                fraction: float = 0.5, seeds: Sequence[int] = (0, 1, 2), step: int = 8,
                protocol: WholeModelProtocol = DEFAULT_PROTOCOL) -> list[PathCheck]:
    """Descents driven by each of `corrections` on `estimator`'s unit figures (one per seed),
    their final networks measured with the unpruned one in one interleaved pass, and each
    estimated under every correction.

    Returns:
        one PathCheck per (correction, seed), in that order.
    Raises:
        host.device.client.DeviceError: a measurement failed.
    """
    estimates = {name: estimate_with(estimator, c) for name, c in corrections.items()}
    descents = [(name, seed, descend(network, est, fraction, seed, step))
                for name, est in estimates.items() for seed in seeds]
    blobs = [network.onnx()] + [network.onnx(d.config) for _, _, d in descents]
    rounds = measure_networks(pool.clients[0], blobs, session, protocol)
    out = []
    for i, (name, seed, d) in enumerate(descents, start=1):
        fig = rounds.figure(i)
        specs = network.specs(d.config)
        out.append(PathCheck(name, seed, d, {n: e(specs) for n, e in estimates.items()},
                             fig.value, fig.low, fig.high, fig.tight, rounds.ratio(i, 0).value))
    return out


def order_agreement(checks: Sequence[PathCheck], correction: str) -> tuple[int, int]:
    """How many pairs of the checked networks `correction` orders as the device does, of the
    pairs the device resolves (their figures further apart than either one's interval).

    What the engine asks of a table is an order: which proposal saves more. An estimate can be
    off by a constant factor and order every pair right, or be close on average and order them
    wrong. Returns (agreeing pairs, resolved pairs).
    """
    agree = resolved = 0
    for a, b in itertools.combinations(checks, 2):
        if abs(a.measured_ms / b.measured_ms - 1) <= max(a.rel_halfwidth, b.rel_halfwidth):
            continue
        resolved += 1
        agree += ((a.measured_ms - b.measured_ms)
                  * (a.estimated_ms[correction] - b.estimated_ms[correction]) > 0)
    return agree, resolved
