"""A table's estimates checked where an optimiser takes them: NetAdapt descents, untrained.

Random variants (`host.lut_validation.validate`) test a table where its calibration networks
lie: pruned near uniformly. The engine goes elsewhere. Each iteration it removes filters where
the estimate says they save most, so it exploits whatever the estimate attributes wrongly and
ends on the networks the table estimates worst. Seen 2026-12-01: a correction with a weights
term (lut/calibration.py) predicted random MobileNetV1 variants well and the final network of
`make run` 41% low.

A descent follows the engine's proposal rule (Yang et al., ECCV 2018, Sec. 3.2; here
`host.engine.proposals.choose_proposals`): each iteration, for every group the fewest filters
whose removal cuts the estimate by the reduction target (initial reduction x the original's
estimate x decay^i, clipped to what is left, as the engine clips it), until the estimate is at
`fraction` of the original's. No training: each iteration takes one of the proposals at random
(seeded), as accuracy picks one the table cannot foresee. The final networks of descents driven
by each estimator are then measured in one interleaved pass with the unpruned network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from device_server.spec import LayerSpec, SessionSpec
from host.device.pool import DevicePool
from host.device.whole_model import DEFAULT_PROTOCOL, WholeModelProtocol, measure_networks
from host.engine.proposals import choose_proposals
from host.network import ChannelConfig, Network
from lut.estimator import LatencyEstimator

__all__ = ["Descent", "PathCheck", "descend", "check_paths"]

Estimate = Callable[[Sequence[LayerSpec]], float]


@dataclass(frozen=True)
class Descent:
    config: ChannelConfig
    iterations: int
    estimated_ms: float    # by the estimator that drove it
    reached: bool          # its estimate got to `fraction` of the original's


@dataclass(frozen=True)
class PathCheck:
    """One descent's final network: every estimator's figure beside the measured one."""

    driven_by: str
    seed: int
    descent: Descent
    estimated_ms: dict[str, float] = field(default_factory=dict)  # by estimator name
    measured_ms: float = 0.0          # the whole network's robust figure on the device
    measured_low_ms: float = 0.0      # its 95% interval (host/device/whole_model.py)
    measured_high_ms: float = 0.0
    tight: bool = False
    measured_ratio: float = 0.0       # to the unpruned network, in the same rounds

    def rel_error(self, estimator: str) -> float:
        """(estimate - measured) / measured, signed: < 0 is an under-estimate."""
        return self.estimated_ms[estimator] / self.measured_ms - 1


def descend(network: Network, estimate: Estimate, fraction: float = 0.5, seed: int = 0,
            step: int = 8, initial_reduction: float = 0.05, decay: float = 0.98,
            max_iterations: int = 200) -> Descent:
    """A greedy NetAdapt descent on `estimate` (module docstring) from the unpruned network.

    Args:
        estimate: milliseconds of a network's unit specs, e.g. `LatencyEstimator.estimate`.
        fraction: where it stops, of the original's estimate, in (0, 1).
        seed: picks among each iteration's proposals.
    Raises:
        ValueError: `fraction` outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    config = network.full_config()
    original = current = estimate(network.specs(config))
    goal = fraction * original
    iterations = 0
    while current > goal and iterations < max_iterations:
        target = min(initial_reduction * original * decay ** iterations, current - goal)
        proposals = choose_proposals(network.groups, config, network.specs, estimate, target,
                                     step)
        if not proposals:
            break
        config = dict(rng.choice(proposals).config)
        current = estimate(network.specs(config))
        iterations += 1
    return Descent(config, iterations, current, current <= goal)


def check_paths(pool: DevicePool, network: Network, session: SessionSpec,
                estimators: Mapping[str, LatencyEstimator], fraction: float = 0.5,
                seeds: Sequence[int] = (0, 1, 2), step: int = 8,
                protocol: WholeModelProtocol = DEFAULT_PROTOCOL) -> list[PathCheck]:
    """Descents driven by each of `estimators` (one per seed), their final networks measured
    with the unpruned one in one interleaved pass, and each estimated by every estimator.

    Returns:
        one PathCheck per (estimator, seed), in that order.
    Raises:
        host.device.client.DeviceError: a measurement failed.
    """
    descents = [(name, seed, descend(network, est.estimate, fraction, seed, step))
                for name, est in estimators.items() for seed in seeds]
    blobs = [network.onnx()] + [network.onnx(d.config) for _, _, d in descents]
    rounds = measure_networks(pool.clients[0], blobs, session, protocol)
    out = []
    for i, (name, seed, d) in enumerate(descents, start=1):
        fig = rounds.figure(i)
        specs = network.specs(d.config)
        out.append(PathCheck(name, seed, d,
                             {n: e.estimate(specs) for n, e in estimators.items()},
                             fig.value, fig.low, fig.high, fig.tight, rounds.ratio(i, 0).value))
    return out
