"""Building, estimating and validating lookup tables with a real daemon on loopback, real ONNX
Runtime and real SQLite files."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from device_server.server import RunningServer
from device_server.spec import LayerSpec, SessionSpec
from device_server.stats import Conditions, TimingStats
from host.cli.netadapt_host import main as host_main
from host.device.client import DeviceClient, DeviceError, Measurement
from host.device.local_daemon import start_local_daemon
from host.device.pool import DevicePool, PoolReport
from host.device.table_builder import (
    BuildReport,
    DriftGuard,
    NoiseGuard,
    build_table,
    identity_for,
    measure_into,
)
from host.device.whole_model import WholeModelProtocol
from host.lut_validation import calibrate, on_demand
from host.network import Network, analyse, load_network, random_config
from lut.calibration import MODEL_KIND, CalibrationSample, fit_correction
from lut.estimator import LatencyEstimator, LutMissingKeyError
from lut.keys import candidate_counts, plan_keys
from lut.store import LutIdentity, LutStore
from tests.conftest import FAST_POLICY

SESSION = SessionSpec(intra_op_threads=1)
# Counting tests must not depend on this shared machine's drift: no re-measured windows.
NO_DRIFT = DriftGuard(threshold=float("inf"), policy=FAST_POLICY)
CONDITIONS = Conditions(device_fingerprint="dev", ort_version="1",
                        provider="CPUExecutionProvider", intra_op_threads=1,
                        graph_optimization="all")


class SmallNet(nn.Module):
    """Conv-BN-ReLU6, a depthwise separable block with a residual add, and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.pw(self.dw(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def network() -> Network:
    torch.manual_seed(0)
    return analyse("small", SmallNet(), (1, 1, 16, 16))


@pytest.fixture()
def pool(daemon: RunningServer) -> DevicePool:
    return DevicePool([DeviceClient(daemon.address)])


def _store(path: Path, pool: DevicePool) -> LutStore:
    return LutStore.open(path, identity_for(pool.info, SESSION))


def test_candidate_counts_are_the_grid_plus_the_original() -> None:
    assert candidate_counts(24, 8) == [8, 16, 24]
    assert candidate_counts(20, 8) == [8, 16, 20]
    assert candidate_counts(32, 16) == [16, 32]


def test_plan_holds_every_spec_the_engine_can_ask_for(network: Network) -> None:
    plan = plan_keys(network.planner, step=8)
    assert plan.entries >= len(plan) > 0
    keys = set(plan.specs)
    rng = random.Random(3)
    for _ in range(30):
        config = {g.id: rng.choice(candidate_counts(g.channels, 8)) for g in network.groups}
        assert set(network.specs(config)) <= keys


def test_build_stores_every_key_and_resumes_for_free(network: Network, pool: DevicePool,
                                                     tmp_path: Path) -> None:
    plan = plan_keys(network.planner, step=8)
    with _store(tmp_path / "t.sqlite", pool) as store:
        first = build_table(store, pool, plan.specs, SESSION, FAST_POLICY, drift=NO_DRIFT,
                             progress=False)
        assert first.measured == len(plan) and first.present == 0 and not first.failed
        assert not store.missing([s.key() for s in plan.specs])
        again = build_table(store, pool, plan.specs, SESSION, FAST_POLICY, drift=NO_DRIFT,
                             progress=False)
        assert again.measured == 0 and again.present == len(plan)


def test_drift_guard_remeasures_the_window(network: Network, pool: DevicePool,
                                           tmp_path: Path) -> None:
    specs = plan_keys(network.planner, step=8).specs[:6]
    always = DriftGuard(window=3, threshold=-1.0, policy=FAST_POLICY)  # every check "drifts"
    with _store(tmp_path / "t.sqlite", pool) as store:
        report = build_table(store, pool, specs, SESSION, FAST_POLICY, drift=always,
                             progress=False)
    assert report.remeasured_windows == 2
    assert report.measured == 2 * len(specs)
    assert any("re-measuring" in e for e in report.drift_events)


def test_killed_daemon_loses_nothing_and_the_build_resumes(network: Network,
                                                           tmp_path: Path) -> None:
    specs = list(plan_keys(network.planner, step=8).specs)
    path = tmp_path / "t.sqlite"
    stored = 0
    with start_local_daemon() as victim, DevicePool([victim.client(retries=0)]) as pool:
        pool.chunk = 2
        with _store(path, pool) as store:
            original_put = store.put

            def put_then_kill(*args: object, **kwargs: object) -> None:
                nonlocal stored
                original_put(*args, **kwargs)  # type: ignore[arg-type]
                stored += 1
                if stored == 5:
                    victim.process.kill()

            store.put = put_then_kill  # type: ignore[method-assign]
            with pytest.raises(DeviceError):
                build_table(store, pool, specs, SESSION, FAST_POLICY, drift=NO_DRIFT,
                                progress=False)
    with LutStore.open(path) as store:
        kept = store.count("unit")
    assert kept >= 4  # every committed row survived the kill
    with start_local_daemon() as fresh, DevicePool([fresh.client()]) as pool:
        with _store(path, pool) as store:
            report = build_table(store, pool, specs, SESSION, FAST_POLICY, drift=NO_DRIFT,
                                progress=False)
            assert report.present == kept
            assert report.measured == len(specs) - kept
            assert store.count("unit") == len(specs)


def test_pool_requeues_the_work_of_a_device_that_dies(network: Network, daemon: RunningServer,
                                                      tmp_path: Path) -> None:
    specs = list(plan_keys(network.planner, step=8).specs)
    with start_local_daemon() as victim:
        pool = DevicePool([victim.client(retries=0), DeviceClient(daemon.address)], chunk=3)
        seen = 0

        def kill_after_two(_: object) -> None:
            nonlocal seen
            seen += 1
            if seen == 2:
                victim.process.kill()

        report = pool.measure(specs, SESSION, FAST_POLICY, kill_after_two)
        pool.close()
    assert seen == len(specs)  # every spec answered once, by one device or the other
    lost = [d for d in report.devices if d.lost]
    assert len(lost) == 1 and lost[0].address == victim.address
    assert sum(d.measured for d in report.devices) == len(specs)


def test_estimator_sums_interpolates_and_names_missing_keys(network: Network,
                                                            pool: DevicePool) -> None:
    conv = LayerSpec.create("conv2d", (1, 16, 8, 8), out_channels=8, kernel=1)
    medians = {
        conv.key(): 0.010,
        LayerSpec.create("conv2d", (1, 16, 8, 8), out_channels=24, kernel=1).key(): 0.030,
    }
    est = LatencyEstimator(medians, overhead_ms=0.002)
    assert est.estimate([conv]) == pytest.approx(0.012)
    mid = LayerSpec.create("conv2d", (1, 16, 8, 8), out_channels=16, kernel=1)
    assert est.unit_ms(mid) == pytest.approx(0.020)  # halfway on the grid
    assert est.interpolated == 1
    far = LayerSpec.create("conv2d", (1, 16, 8, 8), out_channels=40, kernel=1)
    with pytest.raises(LutMissingKeyError, match="conv1x1/s1 16->40"):
        est.unit_ms(far)
    strict = LatencyEstimator(medians, overhead_ms=0.002, interpolate=False)
    with pytest.raises(LutMissingKeyError, match="no entry"):
        strict.unit_ms(mid)


def test_on_demand_estimator_measures_only_what_it_needs(network: Network, pool: DevicePool,
                                                         tmp_path: Path) -> None:
    from host.device.table_builder import ensure_overhead
    from host.lut_validation import on_demand

    with _store(tmp_path / "t.sqlite", pool) as store:
        ensure_overhead(store, pool, SESSION)
        est = LatencyEstimator.from_store(store, fetch=on_demand(store, pool, SESSION))
        specs = network.specs()
        assert est.estimate(specs) > 0
        assert est.fetched == len(set(specs)) == store.count("unit")
        est.estimate(specs)
        assert est.fetched == len(set(specs))  # cached: nothing measured twice


def _samples(per_mb: float, count: int = 8) -> list[CalibrationSample]:
    """Networks of 20 units whose whole latency is 0.003 + 0.9·Σu − 0.002·20 + per_mb·W."""
    rng = random.Random(0)
    samples = []
    for _ in range(count):
        s, w = rng.uniform(0.1, 1.0), rng.uniform(0.5, 12.0)
        samples.append(CalibrationSample((s, 20.0, w),
                                         0.003 + 0.9 * s - 20 * 0.002 + per_mb * w, 0.003))
    return samples


def test_correction_recovers_a_known_relation() -> None:
    c = fit_correction(_samples(0.01), weights_term=True)
    assert (c.c_sum, c.c_units, c.c_weights) == pytest.approx((0.9, -0.002, 0.01))
    assert fit_correction(_samples(0.01)[:2]).is_identity  # too few to fit
    # By default (lut/calibration.py says why), or too few for it: no weights term.
    for c in (fit_correction(_samples(0.01)), fit_correction(_samples(0.01, count=5), True)):
        assert c.c_weights == 0.0 and c.c_sum > 0
    exact = fit_correction([dataclasses.replace(s, features=(*s.features[:2], 0.0))
                            for s in _samples(0.0)])
    assert (exact.c_sum, exact.c_units) == pytest.approx((0.9, -0.002))


def test_a_weights_term_the_networks_cannot_separate_is_dropped() -> None:
    """Weights that grow in step with the unit sums cannot be told apart from them."""
    rng = random.Random(1)
    samples = []
    for _ in range(8):
        s = rng.uniform(0.1, 1.0)
        samples.append(CalibrationSample((s, 20.0, 10 * s), 0.003 + 0.9 * s - 0.04, 0.003))
    c = fit_correction(samples, weights_term=True)
    assert c.c_weights == 0.0 and c.c_sum == pytest.approx(0.9)


def test_a_weights_term_that_would_save_time_is_dropped() -> None:
    """Streaming weights cannot make a network faster: a negative fit is noise, refused."""
    c = fit_correction(_samples(-0.01), weights_term=True)
    assert c.c_weights == 0.0 and c.samples == 8 and c.c_sum > 0


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = host_main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_validate_cli_reports_errors_as_json(daemon: RunningServer, tmp_path: Path) -> None:
    code, out, err = _cli("lut", "validate", "--model", "tiny_cnn", "--device", daemon.address,
                          "--lut", str(tmp_path / "t.sqlite"), "--variants", "3",
                          "--calibrate", "4", "--min-rounds", "3", "--max-rounds", "3",
                          "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["rows"]) == 3
    assert 0 <= data["median_abs_rel_error"] <= data["max_abs_rel_error"]
    assert all(r["measured_ms"] > 0 and r["estimated_ms"] > 0 for r in data["rows"])
    # Every variant carries its measured interval, around its figure, from its 3 rounds.
    assert all(r["measured_low_ms"] <= r["measured_ms"] <= r["measured_high_ms"]
               and r["rounds"] == 3 for r in data["rows"])
    # ... and its fraction of the unpruned network measured in the same rounds, with the
    # estimate's error on that fraction (what a relative budget rests on).
    assert data["reference_ms"] > 0
    for r in data["rows"]:
        assert r["measured_ratio_low"] <= r["measured_ratio"] <= r["measured_ratio_high"]
        assert 0 < r["estimated_ratio"] < 1.5 and 0 < r["measured_ratio"] < 1.5
        expected = (r["estimated_ratio"] - r["measured_ratio"]) / r["measured_ratio"]
        assert r["ratio_rel_error"] == pytest.approx(expected)
    assert 0 <= data["median_abs_ratio_error"] <= data["max_abs_ratio_error"]
    # Every key it measured was measured again in a late pass; the estimate before it is kept.
    assert data["keys_revisited"] == data["keys_fetched"] > 0
    assert 0 <= data["keys_faster"] <= data["keys_revisited"]
    assert all(r["first_estimated_ms"] > 0 for r in data["rows"])
    assert data["first_max_abs_rel_error"] >= data["first_median_abs_rel_error"] >= 0


def test_a_late_pass_replaces_an_inflated_key_and_keeps_a_faster_one(
    daemon: RunningServer, tmp_path: Path
) -> None:
    # A burst that outlasts a key's two back-to-back passes leaves it tight but slow; the late
    # pass measures it again and keeps the faster figure, never a slower one.
    session = SessionSpec(intra_op_threads=1)
    pool = DevicePool([DeviceClient(daemon.address)])
    net = load_network("tiny_cnn", (1, 1, 28, 28), 10)
    specs = list(dict.fromkeys(net.specs()))[:3]
    with LutStore.open(tmp_path / "t.sqlite", identity_for(pool.info, session)) as store:
        fetch = on_demand(store, pool, session)
        first = fetch(specs)
        assert list(fetch.measured) == specs
        inflated, faster, untouched = specs
        slow, fast = store.get(inflated), store.get(faster)
        assert slow is not None and fast is not None
        stored_slow = _scaled(slow, 10.0)
        store.put(inflated, stored_slow)
        store.put(faster, _scaled(fast, 1e-3))
        moved = fetch.revisit()
        assert inflated in moved and moved[inflated][1] < stored_slow.robust_ms / 3
        assert store.get(inflated).robust_ms < stored_slow.robust_ms / 3  # type: ignore[union-attr]
        assert faster not in moved
        assert store.get(faster).robust_ms == pytest.approx(fast.robust_ms * 1e-3)  # type: ignore[union-attr]
        assert store.get(untouched).robust_ms <= first[untouched]  # type: ignore[union-attr]


def _scaled(t: TimingStats, k: float) -> TimingStats:
    """`t` as if every sample had taken k times as long."""
    return dataclasses.replace(
        t, median_ms=t.median_ms * k, mean_ms=t.mean_ms * k, std_ms=t.std_ms * k,
        p90_ms=t.p90_ms * k, min_ms=t.min_ms * k, max_ms=t.max_ms * k,
        samples_ms=tuple(x * k for x in t.samples_ms), value_ms=t.value_ms * k,
        ci_low_ms=t.ci_low_ms * k, ci_high_ms=t.ci_high_ms * k)


def test_table_from_other_conditions_is_refused(daemon: RunningServer, tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    code, _, err = _cli("lut", "validate", "--model", "tiny_cnn", "--device", daemon.address,
                        "--lut", str(path), "--variants", "1", "--calibrate", "0",
                        "--min-rounds", "1", "--max-rounds", "1")
    assert code == 0, err
    code, _, err = _cli("lut", "validate", "--model", "tiny_cnn", "--device", daemon.address,
                        "--lut", str(path), "--variants", "1", "--threads", "2")
    assert code == 1
    assert "intra_op_threads" in err and "Traceback" not in err


def test_corrupt_table_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    path.write_bytes(b"this is not a lookup table" * 100)
    code, _, err = _cli("lut", "info", str(path))
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err


def test_random_variants_stay_on_the_grid(network: Network) -> None:
    rng = random.Random(1)
    for _ in range(20):
        config = random_config(network.groups, rng, step=8)
        for g in network.groups:
            assert config[g.id] in candidate_counts(g.channels, 8)


def test_noisy_keys_are_measured_again_on_the_device(network: Network, pool: DevicePool,
                                                     tmp_path: Path) -> None:
    specs = plan_keys(network.planner, step=8).specs[:4]
    every = NoiseGuard(max_spread=1.0, retries=2)  # any spread counts as noise: 2 more passes
    with _store(tmp_path / "t.sqlite", pool) as store:
        report = BuildReport()
        got = measure_into(store, pool, specs, SESSION, FAST_POLICY, report=report, noise=every)
        assert report.measured == len(specs) and report.remeasured == 2 * len(specs)
        for spec in specs:
            row = store.get(spec.key())
            assert row is not None and row.robust_ms == got[spec]


def test_the_tightest_of_repeated_measurements_is_kept(tmp_path: Path) -> None:
    """A device answering first with a burst of load in the samples, then quietly."""
    spec = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=1)

    def timing(median: float, lo: float, hi: float) -> TimingStats:
        return TimingStats(median_ms=median, mean_ms=median, std_ms=0.0, p90_ms=hi, min_ms=lo,
                           max_ms=hi, samples_count=5)

    answers = [timing(0.067, 0.017, 0.213), timing(0.0062, 0.0060, 0.0066)]

    class ScriptedPool:
        clients: list[object] = []

        def measure(self, specs, session, policy, on_result):  # type: ignore[no-untyped-def]
            on_result(Measurement(request_id="r", spec=specs[0], timing=answers.pop(0),
                                  conditions=CONDITIONS, started_unix_ns=0, finished_unix_ns=0,
                                  config_hash="h"))
            return PoolReport()

    identity = LutIdentity(conditions=dataclasses.replace(CONDITIONS, provider="CPU"))
    with LutStore.open(tmp_path / "t.sqlite", identity) as store:
        report = BuildReport()
        got = measure_into(store, ScriptedPool(), [spec], SESSION, FAST_POLICY,  # type: ignore[arg-type]
                           report=report)
        row = store.get(spec.key())
    assert got[spec] == 0.0062 and row is not None and row.median_ms == 0.0062
    assert (report.measured, report.remeasured) == (1, 1) and not answers


def test_extra_passes_measure_every_key_again_and_keep_the_fastest(
        network: Network, pool: DevicePool, tmp_path: Path) -> None:
    specs = plan_keys(network.planner, step=8).specs[:5]
    with _store(tmp_path / "t.sqlite", pool) as store:
        report = BuildReport()
        got = measure_into(store, pool, specs, SESSION, FAST_POLICY, report=report,
                           noise=NoiseGuard(max_spread=float("inf"), passes=3))
        assert report.measured == len(specs) and report.remeasured == 2 * len(specs)
        assert all(store.get(s.key()).robust_ms == got[s] for s in specs)  # type: ignore[union-attr]


def test_calibration_measures_a_too_wide_network_again(network: Network, pool: DevicePool,
                                                       tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    """A whole network whose interval is wider than the fit accepts is measured once more (and
    the tighter figure kept) rather than refused, which could leave a plain sum."""
    protocol = WholeModelProtocol(min_rounds=2, max_rounds=2)
    with _store(tmp_path / "tight.sqlite", pool) as store, \
            caplog.at_level(logging.INFO, logger="host.lut_validation"):
        assert calibrate(store, pool, network, SESSION, count=4, protocol=protocol,
                         max_halfwidth=float("inf")) == 4
        assert "measuring them again" not in caplog.text
    with _store(tmp_path / "wide.sqlite", pool) as store, \
            caplog.at_level(logging.INFO, logger="host.lut_validation"):
        # Every figure counts as too wide here: all four are measured a second time.
        assert calibrate(store, pool, network, SESSION, count=4, protocol=protocol,
                         max_halfwidth=-1.0) == 4
        assert "4 of 4 whole networks wider than" in caplog.text
        rows = list(store.all_rows(kind=MODEL_KIND))
        assert len(rows) == 4 and all(r.timing.value_ms > 0 for r in rows)
