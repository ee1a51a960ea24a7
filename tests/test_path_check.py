"""NetAdapt descents on a table, untrained, and their final networks measured on a real daemon
on loopback (real ONNX Runtime, a real SQLite table)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from device_server.server import RunningServer
from device_server.spec import LayerSpec, SessionSpec
from host.device.client import DeviceClient
from host.device.pool import DevicePool
from host.device.table_builder import ensure_overhead, identity_for
from host.lut_validation import calibrate, on_demand
from host.network import Network, load_network
from host.path_check import (
    Descent,
    PathCheck,
    check_paths,
    descend,
    estimate_with,
    order_agreement,
)
from lut.calibration import Correction, architecture_of
from lut.estimator import LatencyEstimator
from lut.keys import candidate_counts
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)


@pytest.fixture(scope="module")
def network() -> Network:
    return load_network("tiny_cnn", (1, 1, 28, 28), 10)


def _weights(specs: Sequence[LayerSpec]) -> float:
    return float(sum(s.param_count() for s in specs))


def test_a_descent_stops_at_its_fraction_of_the_original_and_repeats_with_its_seed(
        network: Network) -> None:
    original = _weights(network.specs())
    d = descend(network, _weights, fraction=0.5, seed=3, step=1)
    assert d.reached and d.estimated_ms <= 0.5 * original
    assert d.estimated_ms == _weights(network.specs(d.config))
    # The engine's schedule (targets of 2.5% of the original, decaying) and cap: many steps.
    assert d.iterations >= 10
    assert all(0 < d.config[g.id] <= g.channels for g in network.groups)
    assert descend(network, _weights, fraction=0.5, seed=3, step=1) == d
    # Another seed picks other proposals on the way.
    assert any(descend(network, _weights, 0.5, seed, step=1).config != d.config
               for seed in range(4))
    for bad in ({"fraction": 1.0}, {"max_cut": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            descend(network, _weights, **bad)  # type: ignore[arg-type]


def test_a_descent_clips_its_last_step_to_what_is_left(network: Network) -> None:
    # Steps of 30% of the original: unclipped, the second would end near 0.4 of it.
    original = _weights(network.specs())
    d = descend(network, _weights, fraction=0.5, step=1, initial_reduction=0.3, max_cut=1.0)
    assert 0.45 * original <= d.estimated_ms <= 0.5 * original


def test_a_descent_that_cannot_reach_its_fraction_ends_at_the_floor_and_says_so(
        network: Network) -> None:
    # A fixed cost larger than anything pruning saves: half of the original is out of reach.
    def fixed_cost(specs: Sequence[LayerSpec]) -> float:
        return 1.0 + _weights(specs) / _weights(network.specs())

    d = descend(network, fixed_cost, fraction=0.5, step=4)
    assert not d.reached and d.estimated_ms > 0.5 * fixed_cost(network.specs())
    assert d.config == {g.id: candidate_counts(g.channels, 4)[0] for g in network.groups}


def test_check_paths_measures_every_descent_under_every_correction(
        daemon: RunningServer, network: Network, tmp_path: Path) -> None:
    with DevicePool([DeviceClient(daemon.address)]) as pool, \
            LutStore.open(tmp_path / "t.sqlite", identity_for(pool.info, SESSION)) as store:
        ensure_overhead(store, pool, SESSION)
        calibrate(store, pool, network, SESSION, count=4)
        est = LatencyEstimator.from_store(store, fetch=on_demand(store, pool, SESSION),
                                          architecture=architecture_of(network.specs()))
        # A correction that believes only weights cost time: its descents go elsewhere.
        corrections = {"fitted": est.correction,
                       "weights_only": Correction(c_sum=1e-6, c_weights=1.0, samples=1)}
        checks = check_paths(pool, network, SESSION, est, corrections, fraction=0.9,
                             seeds=(0, 1), step=4)
        fetched = est.fetched
        assert fetched == store.count("unit")  # both share one table: each key measured once
        # Each path is the descent its correction takes on the (now cached) table.
        again = [descend(network, estimate_with(est, corrections[c.driven_by]), 0.9, c.seed, 4)
                 for c in checks]
    assert [(c.driven_by, c.seed) for c in checks] == [
        ("fitted", 0), ("fitted", 1), ("weights_only", 0), ("weights_only", 1)]
    assert [c.descent for c in checks] == again
    for c in checks:
        assert c.estimated_ms[c.driven_by] == pytest.approx(c.descent.estimated_ms)
        specs = network.specs(c.descent.config)
        assert c.estimated_ms["fitted"] == pytest.approx(est.estimate(specs))
        assert 0 < c.measured_low_ms <= c.measured_ms <= c.measured_high_ms
        assert c.measured_ratio > 0


def _checked(measured_ms: float, halfwidth: float, **estimated_ms: float) -> PathCheck:
    return PathCheck("x", 0, Descent({}, 1, 0.0, True), estimated_ms, measured_ms,
                     measured_ms * (1 - halfwidth), measured_ms * (1 + halfwidth), True)


def test_order_agreement_counts_only_the_pairs_the_device_resolves() -> None:
    checks = [_checked(1.00, 0.01, scaled=2.0, swapped=2.2),
              _checked(1.20, 0.01, scaled=2.4, swapped=2.0),
              _checked(1.21, 0.02, scaled=2.3, swapped=2.5)]  # within 2% of the second
    # Resolved pairs: (1.00, 1.20) and (1.00, 1.21). A constant factor orders both right.
    assert order_agreement(checks, "scaled") == (2, 2)
    assert order_agreement(checks, "swapped") == (1, 2)
