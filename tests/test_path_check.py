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
from host.path_check import check_paths, descend
from lut.calibration import Correction, architecture_of
from lut.estimator import LatencyEstimator
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
    # The engine's schedule: targets of at most 5% of the original, so several iterations.
    assert d.iterations >= 5
    assert all(0 < d.config[g.id] <= g.channels for g in network.groups)
    assert descend(network, _weights, fraction=0.5, seed=3, step=1) == d
    # Another seed picks other proposals on the way.
    assert any(descend(network, _weights, 0.5, seed, step=1).config != d.config
               for seed in range(4))
    with pytest.raises(ValueError, match="fraction"):
        descend(network, _weights, fraction=1.0)


def test_a_descent_that_cannot_reach_its_fraction_says_so(network: Network) -> None:
    # Every group at its floor still costs a fixed 1 "ms": half of the original is out of reach.
    def floor_heavy(specs: Sequence[LayerSpec]) -> float:
        return 1.0 + _weights(specs) / _weights(network.specs()) * 0.2

    d = descend(network, floor_heavy, fraction=0.5)
    assert not d.reached and d.estimated_ms > 0.5 * floor_heavy(network.specs())


def test_check_paths_measures_every_descent_against_every_estimator(
        daemon: RunningServer, network: Network, tmp_path: Path) -> None:
    with DevicePool([DeviceClient(daemon.address)]) as pool, \
            LutStore.open(tmp_path / "t.sqlite", identity_for(pool.info, SESSION)) as store:
        ensure_overhead(store, pool, SESSION)
        calibrate(store, pool, network, SESSION, count=4)
        fetch = on_demand(store, pool, SESSION)
        fitted = LatencyEstimator.from_store(store, fetch=fetch,
                                             architecture=architecture_of(network.specs()))
        # A table that believes only weights cost time: its descents go elsewhere.
        weights_only = LatencyEstimator(store.load_values(), fitted.overhead_ms,
                                        Correction(c_sum=1e-6, c_weights=1.0, samples=1),
                                        fetch=fetch)
        checks = check_paths(pool, network, SESSION,
                             {"fitted": fitted, "weights_only": weights_only}, fraction=0.9,
                             seeds=(0, 1), step=4)
    assert [(c.driven_by, c.seed) for c in checks] == [
        ("fitted", 0), ("fitted", 1), ("weights_only", 0), ("weights_only", 1)]
    for c in checks:
        assert c.descent.iterations >= 1  # tiny_cnn's latency is mostly per-call overhead
        assert set(c.estimated_ms) == {"fitted", "weights_only"}
        assert c.estimated_ms[c.driven_by] == pytest.approx(c.descent.estimated_ms)
        assert 0 < c.measured_low_ms <= c.measured_ms <= c.measured_high_ms
        assert 0 < c.measured_ratio < 1.5  # pruned, so not far above the original
        assert c.rel_error("fitted") == pytest.approx(
            c.estimated_ms["fitted"] / c.measured_ms - 1)
    assert checks[0].descent.config != checks[2].descent.config
