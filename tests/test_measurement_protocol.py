"""The robust measurement protocol: intervals that cover what they claim, a timer that takes
preempted samples again, whole-network figures that agree between two runs under a noisy
neighbour, budget decisions made on intervals, and calibration that refuses noisy samples.

Real components throughout: the daemon on loopback, ONNX Runtime, a load generator in other
processes pinned to the daemon's core.
"""

from __future__ import annotations

import io
import os
import random
import statistics
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import (
    ROBUST_QUANTILE,
    Conditions,
    interval_coverage,
    median_interval,
    quantile_interval,
    summarize,
)
from host.device.client import DeviceClient
from host.device.local_daemon import LocalDaemon, start_local_daemon
from host.device.noisy_neighbour import NeighbourConfig, NoisyNeighbour
from host.device.whole_model import Rounds, WholeModelProtocol, measure_networks
from host.engine.config import Budget
from lut.calibration import CalibrationSample, fit_correction
from lut.store import MODEL_KIND, LutIdentity, LutRow, LutStore, with_network_figure
from tests.helpers_engine import small_network


# -- intervals --------------------------------------------------------------------------------
@pytest.mark.parametrize(("q", "n"), [(0.5, 6), (0.5, 10), (0.5, 16), (0.1, 15), (0.1, 60)])
def test_quantile_interval_covers_the_true_quantile_at_its_confidence(q: float, n: int) -> None:
    """Distribution-free: whatever the distribution (here a skewed one, like latencies), the
    interval holds the true quantile as often as it claims (95%, or its clipped coverage when
    n is too small), within the binomial noise of 2,000 trials."""
    rng = np.random.default_rng(0)
    true = float(np.quantile(rng.lognormal(0, 0.5, 2_000_000), q))
    hits = 0
    trials = 2000
    for _ in range(trials):
        values = sorted(rng.lognormal(0, 0.5, n).tolist())
        low, high = quantile_interval(values, q)
        hits += low <= true <= high
    claimed = interval_coverage(n, q)
    assert claimed <= 1 and hits / trials >= claimed - 0.025
    if n >= 35:
        assert claimed >= 0.95


def test_median_interval_of_too_few_values_is_their_range() -> None:
    assert median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    low, high = median_interval([float(v) for v in range(1, 11)])
    assert (low, high) == (2.0, 9.0)  # n=10: x(2)..x(9), 97.9%


def test_summary_reports_the_low_quantile_and_its_interval() -> None:
    samples = [1.0 + 0.01 * i for i in range(50)] + [5.0] * 10  # a burst in 10 samples
    t = summarize(samples, preempted_samples=3, other_load=0.7, steal=0.0)
    ordered = sorted(samples)
    assert t.value_ms == pytest.approx(float(np.quantile(ordered, ROBUST_QUANTILE)))
    assert t.ci_low_ms <= t.value_ms <= t.ci_high_ms < 5.0  # the burst moves nothing
    assert t.median_ms > t.value_ms and t.robust_ms == t.value_ms
    assert (t.preempted_samples, t.other_load) == (3, 0.7)


# -- the timer under a neighbour on its own core --------------------------------------------
@pytest.fixture(scope="module")
def pinned_daemon() -> Iterator[LocalDaemon]:
    with start_local_daemon(threads=1, cpus=[0]) as d:
        yield d


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_preempted_samples_are_taken_again_and_the_load_is_reported(
    pinned_daemon: LocalDaemon,
) -> None:
    net = small_network()
    client = pinned_daemon.client()
    sha = client.upload_model(net.onnx())
    # >= 120 ms of samples: /proc/stat counts 10 ms ticks, and the daemon reports no load (-1)
    # for a timed phase under 50 ms (40 samples of 1 ms were, in CI, between the bursts).
    policy = MeasurePolicy(warmup_runs=5, min_warmup_ms=20, repeat=40, min_repeat_ms=3)
    with NoisyNeighbour(cores=[0], seed=3, duty=0.6, seconds=60):
        timings = [client.measure_model(sha, SessionSpec(), policy).timing for _ in range(5)]
    # The neighbour shares the daemon's only core: the OS switched the timer out, the daemon
    # saw it, took those samples again (up to 3x repeat in all) and says how much else ran.
    assert sum(t.preempted_samples for t in timings) > 0
    assert max(t.other_load for t in timings) > 0.2
    for t in timings:
        assert t.samples_count >= policy.repeat // 2
        assert t.ci_low_ms <= t.value_ms <= t.ci_high_ms


def test_same_networks_measured_twice_under_a_noisy_neighbour_agree_or_are_flagged(
    pinned_daemon: LocalDaemon,
) -> None:
    net = small_network()
    rng = random.Random(5)
    from host.network import random_config

    blobs = [net.onnx(), net.onnx(random_config(net.groups, rng))]
    client = pinned_daemon.client()
    protocol = WholeModelProtocol(max_rounds=12, max_seconds=60)
    cfg = NeighbourConfig(cores=(0,), seed=11, duty=0.5, seconds=120)
    with NoisyNeighbour(config=cfg):
        first = measure_networks(client, blobs, SessionSpec(), protocol)
        second = measure_networks(client, blobs, SessionSpec(), protocol)
    for a, b in zip(first.figures(), second.figures(), strict=True):
        assert a.low <= a.value <= a.high and a.rounds >= protocol.min_rounds
        # A figure is a claim about the machine's state while it was measured; the rest of a
        # shared machine moves between the two passes, so they agree up to 2% beyond their
        # intervals (a miss by 0.00001 ms was seen under a full suite and two benchmarks).
        # Seen in CI beside other tenants' load: 0.0488 [0.0480, 0.0495] then 0.0531 [0.0514,
        # 0.0675], 12 rounds each, both flagged not tight. The protocol's promise is that two
        # figures that disagree are never both reported tight.
        slack = 0.02 * a.value
        agree = a.low - slack <= b.high and b.low - slack <= a.high
        assert agree or not (a.tight and b.tight), (a, b)
    # The ratio of two networks measured in the same rounds cancels what both share: their
    # intervals overlap with no slack.
    ra, rb = first.ratio(1, 0), second.ratio(1, 0)
    assert ra.low <= rb.high and rb.low <= ra.high, (ra, rb)


# -- decisions on intervals -----------------------------------------------------------------
def test_a_drift_over_the_passes_moves_neither_a_figure_nor_a_ratio() -> None:
    # The device slows by 30% halfway through the passes (both networks are measured in every
    # pass, so both see it): each figure reads its fastest rounds, before the drift.
    drift = [1.0] * 4 + [1.3] * 4
    rounds = Rounds([[2.0 * d for d in drift], [1.0 * d for d in drift]], 0.015)
    assert rounds.figure(0).value == pytest.approx(2.0) and rounds.figure(0).tight
    ratio = rounds.ratio(1, 0)
    assert ratio.value == pytest.approx(0.5) and ratio.tight
    assert ratio.low == pytest.approx(0.5) and ratio.high == pytest.approx(0.5)
    # Slowed in 6 passes of 8, the fastest rounds no longer agree: a wide figure, not tight.
    slowed = Rounds([[2.0, 2.6, 2.6, 2.0, 2.6, 2.6, 2.6, 2.6]], 0.015)
    assert slowed.figure(0).value == pytest.approx(2.0) and not slowed.figure(0).tight


def test_a_burst_that_slows_some_rounds_does_not_move_a_ratio() -> None:
    # Both networks slowed by the same 0.1 ms (a burst longer than a pass) in some of 12
    # passes, which compresses those passes' ratio from 0.5 to 0.62. The median of per-pass
    # ratios read 0.5 [0.5, 0.62] with 5 slowed, 0.62 [0.5, 0.62] with 8, and 0.62, tight,
    # with 10. The ratio of the figures reads the clean passes: tight with 7 of 12 clean
    # (its upper bounds are the 5th fastest rounds), wide with 4 or 2.
    clean_o, clean_c, burst = 0.32, 0.16, 0.1
    for slowed, tight in ((5, True), (8, False), (10, False)):
        o = [clean_o + (burst if p < slowed else 0) for p in range(12)]
        c = [clean_c + (burst if p < slowed else 0) for p in range(12)]
        ratio = Rounds([o, c], 0.015).ratio(1, 0)
        assert ratio.value == pytest.approx(0.5, abs=0.02)
        assert ratio.tight is tight and ratio.low <= 0.5 <= ratio.high
    # Seen in `make bench-run` (2026-12-01, run 7, iteration 10): the original's rounds slowed
    # by up to 44% while the candidate's were not. The median of per-pass ratios read 0.573
    # [0.499, 0.689] for a network the next check, 6% smaller by the table, read at 0.637
    # [0.634, 0.638]. The ratio of figures reads 0.67, and its interval is wide: measure more.
    o = [0.452, 0.315, 0.338, 0.454, 0.452, 0.430]
    c = [0.278, 0.217, 0.217, 0.230, 0.226, 0.228]
    ratio = Rounds([o, c], 0.015).ratio(1, 0)
    assert ratio.value == pytest.approx(0.665, abs=0.001) and not ratio.tight


def test_measuring_stops_as_soon_as_the_decision_is_settled(daemon) -> None:  # type: ignore[no-untyped-def]
    net = small_network()
    client = DeviceClient(daemon.address)
    protocol = WholeModelProtocol(min_rounds=3, max_rounds=6, decision_rounds=12)
    # Far from the limit: settled at the minimum number of rounds.
    r = measure_networks(client, [net.onnx()], SessionSpec(), protocol,
                         settled=lambda r: r.figure(0).high <= 1e6)
    assert r.passes == 3
    # A limit inside any interval never settles: measured up to the decision's cap (more
    # than a figure's), and not hidden.
    r = measure_networks(client, [net.onnx()], SessionSpec(), protocol, settled=lambda r: False)
    assert r.passes == 12
    # A figure with no decision riding on it stops at max_rounds, tight or not.
    r = measure_networks(client, [net.onnx()], SessionSpec(),
                         WholeModelProtocol(min_rounds=3, max_rounds=6, decision_rounds=12,
                                            target_halfwidth=1e-9))
    assert r.passes == 6 and not r.figure(0).tight


@pytest.mark.parametrize("argv", [["--max-rounds", "60"],
                                  ["--min-rounds", "8", "--max-rounds", "6"],
                                  ["--target-halfwidth", "0"]])
@pytest.mark.parametrize("command", [["adapt"], ["lut", "validate", "--model", "mobilenet_v2"]])
def test_rounds_that_contradict_each_other_are_refused_before_any_device_work(
    tmp_path: Path, command: list[str], argv: list[str]
) -> None:
    from host.cli.netadapt_host import main

    err = io.StringIO()
    # No daemon listens on port 9: a device error (exit 1) would mean the options were read
    # only after connecting (and, for adapt, after training the base network).
    code = main([*command, "--device", "127.0.0.1:9", "--workdir", str(tmp_path / "w"), *argv]
                if command == ["adapt"] else
                [*command, "--device", "127.0.0.1:9", *argv], out=io.StringIO(), err=err)
    assert code == 2, err.getvalue()
    assert err.getvalue().count("\n") == 1 and "--decision-rounds" in err.getvalue()


def test_a_final_figure_that_is_not_tight_says_so_in_the_summary_line() -> None:
    from host.device.whole_model import Figure
    from host.engine.netadapt import AdaptResult

    def result(ratio: Figure) -> AdaptResult:
        return AdaptResult(Path("w"), 0.3, 0.15, 0.16, 0.3, 0.15, 0.9, 0.9, 0.9, 0.9, 3,
                           budget_fraction=0.5, final_ratio=ratio)

    wide = result(Figure(0.535, 0.504, 0.676, 16, tight=False))
    assert "0.535 of the original [0.504, 0.676] (not tight) = 1.87x" in wide.describe_latency()
    assert not wide.budget_met
    tight = result(Figure(0.49, 0.489, 0.491, 6, tight=True))
    assert "[0.489, 0.491] = 2.04x" in tight.describe_latency() and tight.budget_met


def test_an_absolute_budget_summary_line_also_says_when_the_final_figure_is_not_tight(
) -> None:
    from host.device.whole_model import Figure
    from host.engine.netadapt import AdaptResult

    def result(final: Figure) -> AdaptResult:
        return AdaptResult(Path("w"), 0.3, 0.15, final.value, 0.3, 0.15, 0.9, 0.9, 0.9, 0.9, 3,
                           final_figure=final)

    wide = result(Figure(0.1605, 0.151, 0.203, 16, tight=False))
    assert "0.1605 ms [0.1510, 0.2030] (not tight) measured" in wide.describe_latency()
    assert not wide.budget_met
    tight = result(Figure(0.147, 0.1465, 0.1475, 6, tight=True))
    assert "0.1470 ms [0.1465, 0.1475] measured" in tight.describe_latency() and tight.budget_met


# -- calibration ----------------------------------------------------------------------------
def test_calibration_refuses_samples_with_wide_intervals(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    rng = random.Random(0)
    good = []
    for _ in range(8):  # whole = 0.01 + 0.9 * sum - 0.001 * n, measured within +-1%
        s, n, w = rng.uniform(0.1, 1.0), 30.0, rng.uniform(0.5, 12.0)
        true = 0.01 + 0.9 * s - 0.001 * n
        good.append(CalibrationSample((s, n, w), true * rng.uniform(0.99, 1.01), 0.01, 0.01))
    # Two measurements taken in a burst: 40% slow, and their intervals say so.
    noisy = [CalibrationSample((0.5, 30.0, 6.0), 1.4 * (0.01 + 0.45 - 0.03), 0.01, 0.3),
             CalibrationSample((0.9, 30.0, 11.0), 1.4 * (0.01 + 0.81 - 0.03), 0.01, 0.25)]
    fitted = fit_correction(good + noisy)
    assert "2 of 10 whole-network measurements refused" in caplog.text
    assert fitted.samples == 8
    assert fitted.c_sum == pytest.approx(0.9, rel=0.05)
    # Unknown uncertainty (tables from before the protocol) is used, not refused.
    legacy = [CalibrationSample(g.features, g.measured_ms, g.overhead_ms) for g in good]
    assert fit_correction(legacy).samples == 8


# -- the table keeps the figure and its interval ---------------------------------------------
def test_table_rows_keep_the_robust_figure_interval_and_interference(tmp_path: Path) -> None:
    ident = LutIdentity(conditions=Conditions(
        device_fingerprint="f" * 16, ort_version="1.0", provider="CPUExecutionProvider",
        intra_op_threads=1, graph_optimization="ENABLE_ALL"))
    t = summarize([0.1 + 0.001 * i for i in range(30)], preempted_samples=4, other_load=1.25,
                  steal=0.02)
    with LutStore.open(tmp_path / "t.sqlite", ident) as store:
        store.put("k", t, kind="model")
    with LutStore.open(tmp_path / "t.sqlite", ident, create=False) as store:
        back = store.get("k", kind="model")
        assert back == t
        assert store.load_values("model") == {"k": t.value_ms}
    assert statistics.median(t.samples_ms) == t.median_ms


def test_a_stored_whole_network_row_holds_the_figure_its_schema_defines() -> None:
    """The live figure (`Rounds.timing`) and the one the table's schema defines, with which
    older rows are restated (`lut.store.with_network_figure`), agree: changing PASS_QUANTILE
    or the interval needs a schema migration, and this test says so."""
    rng = random.Random(3)
    for n in (6, 12, 48):
        rounds = Rounds([[0.4 * (1 + rng.expovariate(20)) for _ in range(n)]], 0.015)
        t = rounds.timing(0)
        row = LutRow(key="k", kind=MODEL_KIND, timing=t, measured_at=datetime.now(UTC))
        assert with_network_figure(row).timing == t


# -- the engine under a noisy neighbour ------------------------------------------------------
def test_adaptation_under_a_noisy_neighbour_ends_within_its_budget_not_far_below(
    table, splits, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    from tests.helpers_engine import BUDGET_FRACTION, small_config, small_engine

    fraction = BUDGET_FRACTION
    config = small_config(budget=Budget(fraction=fraction), initial_reduction=0.04)
    with NoisyNeighbour(seed=7, duty=0.5, seconds=600):
        result = small_engine(table, splits, tmp_path / "run", config).run()
    ratio = result.final_ratio
    assert ratio is not None
    # Within the budget by the final interleaved passes (their interval reaches it at least),
    # and not pruned far past it on an inflated reading: at least 85% of the budget.
    assert ratio.low <= fraction, ratio
    assert ratio.value >= 0.85 * fraction, (ratio, [r.budget_check for r in result.history])
