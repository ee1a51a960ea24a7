"""The NetAdapt engine on small networks with the real daemon on loopback: it meets the
budget as measured on the device, writes its outputs, resumes and parallelises without changing
results, and refuses what it cannot do with a clear message."""

from __future__ import annotations

import io
import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from device_server.server import RunningServer
from host.cli.netadapt_host import main as host_main
from host.device.whole_model import Figure
from host.engine.config import Budget
from host.engine.netadapt import (
    BudgetUnreachable,
    CheckpointError,
    IterationRecord,
    NetAdapt,
    _State,
    budget_decision,
    budget_settled,
    describe_check,
    last_measured_estimate,
)
from host.engine.proposals import choose_proposals, grid_steps
from host.engine.report import write_outputs
from host.progress import Progress
from lut.calibration import Correction
from lut.estimator import LatencyEstimator
from tests.helpers_engine import (
    BUDGET_FRACTION,
    small_config,
    small_engine,
    small_network,
    tiny_checkpoint_and_foreign_table,
)
from tests.helpers_process import kill_host_and_find_survivors

_network = small_network
_config = small_config
_engine = small_engine


def test_adaptation_meets_the_measured_budget_and_writes_outputs(table, splits, tmp_path
                                                                 ) -> None:  # type: ignore[no-untyped-def]
    engine = _engine(table, splits, tmp_path / "run", _config())
    result = engine.run()
    assert result.iterations >= 1
    assert result.final_latency_ms < result.original_latency_final_pass_ms
    # The engine stops only once the device measured the network within the budget.
    measured = [r.measured_latency_ms for r in result.history if r.measured_latency_ms]
    assert measured
    # ... decided on the interval of its ratio to the original, measured in the same passes.
    check = result.history[-1].budget_check
    assert check is not None and check["figure"] == "ratio to original"
    assert check["limit"] == BUDGET_FRACTION and _met(check)
    assert check["low"] <= check["value"] <= check["high"] and check["rounds"] >= 6
    assert result.final_ratio is not None and result.budget_fraction == BUDGET_FRACTION
    # The final pass keeps every pass: [original, final][pass] ms, whose ratio is the figure.
    original_passes, final_passes = result.final_passes_ms or [[], []]
    assert len(final_passes) == result.final_ratio.rounds
    assert _tenth(final_passes) / _tenth(original_passes) == pytest.approx(
        result.final_ratio.value)
    ests = [r.estimated_latency_ms for r in result.history]
    assert ests == sorted(ests, reverse=True)
    summary = write_outputs(tmp_path / "run", result, engine.final_model, engine.network,
                            engine.config, baseline=[])
    for key in ("original_latency_ms", "final_latency_ms", "budget_ms", "estimated_latency_ms",
                "original_accuracy", "final_accuracy", "iterations"):
        assert key in summary
    run = tmp_path / "run"
    lines = (run / "history.jsonl").read_text().splitlines()
    assert len(lines) == result.iterations
    # The measurement that stopped the run is in the file too, not only in memory.
    assert json.loads(lines[-1])["measured_latency_ms"] == measured[-1]
    assert {"iteration", "group_id", "channels", "estimated_latency_ms", "holdout_accuracy",
            "seconds"} <= set(json.loads(lines[0]))
    assert (run / "accuracy_vs_latency.png").stat().st_size > 1000
    assert "NetAdapt run" in (run / "report.md").read_text()
    loaded = torch.jit.load(str(run / "final_model.pt"))  # no model code needed
    x = torch.randn(1, 1, 28, 28)
    expected = engine.final_model(x).detach().numpy()
    np.testing.assert_allclose(loaded(x).detach().numpy(), expected, atol=1e-4)
    sess = ort.InferenceSession(str(run / "final_model.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_an_uncalibrated_table_off_by_a_factor_still_reaches_a_relative_budget(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    # A table whose calibration networks were all too noisy to fit on holds plain sums, ~3x
    # the measured network for tiny ones (seen in CI). Its budget is the fraction of the
    # original's *estimate*, not milliseconds compared with the measured original, and with
    # estimates that far off every iteration is measured.
    pool, store, est = table
    fetch = est.fetch
    assert fetch is not None
    plain_x3 = LatencyEstimator({k: 3 * v for k, v in store.load_values().items()},
                                3 * est.overhead_ms,
                                fetch=lambda specs: {s: 3 * v for s, v in fetch(specs).items()})
    assert plain_x3.correction.is_identity
    engine = small_engine((pool, store, plain_x3), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.8)))
    result = engine.run()
    assert result.estimated_latency_ms > 1.5 * result.original_latency_ms  # the premise held
    check = result.history[-1].budget_check
    assert check is not None and check["limit"] == 0.8 and _met(check)
    assert all(r.measured_latency_ms is not None for r in result.history)


def test_a_table_with_flatter_ratios_than_the_device_lets_the_device_decide(
    table, splits, tmp_path, caplog  # type: ignore[no-untyped-def]
) -> None:
    # Plain sums count every unit's fixed cost, so the smallest network on the grid can look
    # like 0.86 of the original to the table while the device runs it at a fraction of that.
    pool, store, est = table
    full = small_network().full_config()
    plain = LatencyEstimator(store.load_values(), est.overhead_ms, fetch=est.fetch)
    per_unit = 10 * plain.estimate(small_network().specs(full))
    flat = LatencyEstimator(store.load_values(), est.overhead_ms,
                            Correction(c_sum=1.0, c_units=per_unit, samples=1), fetch=est.fetch)
    engine = small_engine((pool, store, flat), splits, tmp_path / "run", _config())
    assert engine.reachable_ms() > 0.9 * flat.estimate(engine.network.specs(full))
    with caplog.at_level("WARNING", logger="host.engine.netadapt"):
        result = engine.run()
    assert "the device measures" in caplog.text
    check = result.history[-1].budget_check
    assert check is not None and check["limit"] == BUDGET_FRACTION and _met(check)
    smallest = engine._load().smallest
    if smallest is None:
        # Seen in CI under load: the floor's tiny keys, measured on demand in a burst, put
        # the smallest network at or above the original (the plain sums differ by ~0.05 ms
        # here). No line to draw: the engine steers by the fraction, says so, and the device
        # still decides (met above).
        assert "does not see the smallest network as faster" in caplog.text
        assert engine.reachable_ms() >= flat.estimate(engine.network.specs(full))
    else:
        # The line's far end is checkpointed: a resumed run retargets on the same secant.
        assert smallest[0] < flat.estimate(engine.network.specs(full))
        assert smallest[1] < BUDGET_FRACTION
    # An absolute budget the smallest network misses on the device too is refused, naming both.
    refused = small_engine((pool, store, flat), splits, tmp_path / "refused",
                           _config(budget=Budget(ms=1e-4)))
    # (1.000 when the floor's keys measured in a burst put it at the original: seen in CI.)
    named = r"table estimates (0\.9|1\.)\d+ of the original and the device measures"
    with pytest.raises(BudgetUnreachable, match=named):
        refused.run()
    assert not (tmp_path / "refused").exists()


def test_a_relative_budget_aims_the_table_at_its_ratio_not_at_one_measurement_of_the_original(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    # Seen on the 64x64 task: the original measured at the start under other tenants' load
    # 34% above the calibrated table's estimate of it. Aimed at the budget's milliseconds,
    # the table's target sat 1.6% below the original's estimate for a 75% budget. The checks
    # of a relative budget are ratios, so the table aims at the same ratio of its estimate.
    calibrated = _calibrated(table)
    quiet = small_engine(calibrated, splits, tmp_path / "quiet", _config())
    full = quiet._estimate(quiet.network.full_config())
    aim = quiet._aim(BUDGET_FRACTION)
    for original_ms in (full, 1.34 * full, 0.8 * full):
        assert quiet._estimate_target(aim * original_ms, original_ms, full) == pytest.approx(
            aim * full), original_ms
    # An absolute budget is milliseconds on the device: a calibrated table aims at it as is.
    absolute = small_engine(calibrated, splits, tmp_path / "ms",
                            _config(budget=Budget(ms=0.8 * full)))
    assert absolute._estimate_target(0.8 * full, 1.34 * full, full) == pytest.approx(0.8 * full)


def test_a_table_that_over_estimates_pruned_networks_cannot_carry_the_run_past_the_budget(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # Seen in bench-adapt (when the table aimed in milliseconds): a calibrated table that
    # estimated a run's networks 39% above the device put the first check at 0.279 of the
    # original for a budget of 0.35. In the ratio the table now aims at, the same fault is a
    # table whose ratios run flatter than the device's. Here the table carries a fixed cost
    # the device does not have (the original's estimate again), so it estimates every pruned
    # network at a larger ratio to the original than the device measures: (r + 1) / 2 for r.
    # It meets its target (the aim, 0.88 of the original's estimate) only once the device runs
    # the network at ~0.76 of the original.
    pool, store, est = table
    fit = est.correction
    full = est.estimate(small_network().specs(small_network().full_config()))
    over = LatencyEstimator(store.load_values(), est.overhead_ms + full,
                            Correction(c_sum=fit.c_sum, c_units=fit.c_units,
                                       c_weights=fit.c_weights, samples=1),
                            fetch=est.fetch)
    budget = Budget(fraction=0.9)
    # Checks only by the cadence (every 2% the estimate falls, 4% on the device here): none
    # because the estimate neared its target.
    monkeypatch.setattr("host.engine.netadapt.MEASURE_WITHIN", -0.5)
    monkeypatch.setattr("host.engine.netadapt.MEASURE_EVERY_DROP", 0.02)
    config = _config(budget=budget, initial_reduction=0.02)
    first = small_engine((pool, store, over), splits, tmp_path / "run", config)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the long-term fine-tune, after the check met

    first._finish = interrupted  # type: ignore[method-assign,assignment]
    with pytest.raises(KeyboardInterrupt):
        first.run()
    # history.jsonl holds the check that met; the checkpoint does not (it is written with the
    # next step).
    state = first._load()
    on_disk = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])
    assert on_disk["iteration"] == state.iteration - 1
    assert on_disk["budget_check"]["decision"] == "met"
    assert state.iteration not in state.measured
    # Resumed, the run checks that network again before any step, not prune on unchecked.
    resumed = small_engine((pool, store, over), splits, tmp_path / "run", config)
    checked: list[int] = []
    check = resumed._check_budget

    def counted(s: _State, model: torch.nn.Module) -> tuple[bool, float, dict[str, Any]]:
        checked.append(s.iteration)
        return check(s, model)

    resumed._check_budget = counted  # type: ignore[method-assign,assignment]
    result = resumed.run(resume=True)
    assert checked and checked[0] == state.iteration, (checked, state.iteration)
    checks = [r.budget_check for r in result.history if r.budget_check]
    assert checks and _met(checks[-1])  # type: ignore[arg-type]
    # The run stopped near the budget, not where the estimate met its target far below it.
    assert result.final_ratio is not None and result.final_ratio.value >= 0.8, (
        result.final_ratio, [(c["value"], c["decision"]) for c in checks])  # type: ignore[index]


def _calibrated(table):  # type: ignore[no-untyped-def]
    """The fixture's table, counted as calibrated even where every calibration network was
    too noisy to fit on (an uncalibrated table has every iteration measured)."""
    pool, store, est = table
    fit = est.correction
    return pool, store, LatencyEstimator(
        store.load_values(), est.overhead_ms,
        Correction(c_sum=fit.c_sum, c_units=fit.c_units, c_weights=fit.c_weights,
                   samples=max(1, fit.samples)), fetch=est.fetch)


def test_a_table_with_no_saving_left_hands_the_stop_to_the_device(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # Seen in CI: a table flatter than the device (the smallest network estimated at 0.95 of
    # the original's, measured at 0.30) came to where it estimated no saving from any step,
    # between checks, and the run ended "no layer can be pruned further" under a budget the
    # device would have found met. Here no check happens on the way down at all: the check
    # where the table runs out must decide.
    monkeypatch.setattr("host.engine.netadapt.MEASURE_WITHIN", -0.99)
    monkeypatch.setattr("host.engine.netadapt.MEASURE_EVERY_DROP", 1.0)
    engine = small_engine(_calibrated(table), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.75), initial_reduction=0.5,
                                  max_cut=1.0, short_term_steps=1))
    result = engine.run()  # before the fix: BudgetUnreachable
    h = result.history
    checked = [k for k, r in enumerate(h) if r.budget_check]
    assert checked and checked[-1] == len(h) - 1 and _met(h[-1].budget_check)  # type: ignore[arg-type]
    assert h[-1].budget_check["high"] <= 0.75  # type: ignore[index]
    # Every check was made where the table ran out of savings (a grid step follows, unless
    # it was the last) or on a network a grid step made (a wide interval at the first can
    # need steps): none by the cadence, switched off here.
    assert all(h[k].grid_step or k == len(h) - 1 or h[k + 1].grid_step for k in checked)
    on_disk = json.loads((tmp_path / "run" / "history.jsonl").read_text().splitlines()[-1])
    assert on_disk["budget_check"]["decision"] == "met"


def test_a_flat_table_steps_down_the_grid_checked_by_the_device(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # A table that estimates no saving anywhere while the device measures the network above
    # its budget: one grid step per layer each iteration, every network checked, until the
    # device finds one within the budget.
    monkeypatch.setattr("host.engine.netadapt.choose_proposals", lambda *a, **k: [])
    engine = small_engine(_calibrated(table), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.9), step=32, short_term_steps=1))
    result = engine.run()
    assert result.history, "the original is above the budget: at least one step"
    for r in result.history:  # one grid step of one group each iteration
        before = result.history[r.iteration - 1].channels if r.iteration else \
            engine.network.full_config()
        changed = [g for g in r.channels if r.channels[g] != before[g]]
        assert len(changed) == 1 and before[changed[0]] - r.channels[changed[0]] == 32
        assert r.grid_step and r.target_reduction == 0.0
    checks = [r.budget_check for r in result.history]
    assert all(checks) and _met(checks[-1])  # type: ignore[arg-type]
    assert not any(_met(c) for c in checks[:-1])  # type: ignore[arg-type]
    assert result.final_ratio is not None and result.final_ratio.value <= 0.9


def test_the_network_a_grid_step_makes_is_checked_before_the_table_steers_again(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # The table finds no saving once, then (noise) a small one: the network the grid step
    # made is checked before the run prunes on the table's word again, whatever the cadence.
    monkeypatch.setattr("host.engine.netadapt.MEASURE_WITHIN", -0.99)
    monkeypatch.setattr("host.engine.netadapt.MEASURE_EVERY_DROP", 1.0)
    calls: list[int] = []

    def once_flat(*args: Any, **kw: Any) -> list[Any]:
        calls.append(1)
        return [] if len(calls) == 1 else choose_proposals(*args, **kw)

    monkeypatch.setattr("host.engine.netadapt.choose_proposals", once_flat)
    engine = small_engine(_calibrated(table), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.5), step=32, short_term_steps=1,
                                  max_iterations=2))
    # (Not the start's check of the budget against the grid's floor: not what is tested.)
    monkeypatch.setattr(engine, "_initial_target", lambda budget, original: (0.0, None))
    result = engine.run()
    first = result.history[0]
    assert first.grid_step and first.budget_check is not None
    assert len(result.history) == 1 or not result.history[1].grid_step


def test_a_run_at_the_grid_floor_above_the_budget_says_what_the_device_measured(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # Every group already at its smallest count (a grid as coarse as the widest layer), the
    # table kept from refusing the budget at the start: the run ends with one line naming the
    # device's figure and the grid.
    widest = max(g.channels for g in _network().groups)
    engine = small_engine(_calibrated(table), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.5), step=widest))
    monkeypatch.setattr(engine, "_initial_target", lambda budget, original: (0.0, None))
    with pytest.raises(BudgetUnreachable, match=r"no layer can be pruned further: at iteration "
                                                r"0 .* the device measured [0-9.]+ ms .* "
                                                rf"smallest count on the {widest}-channel grid"):
        engine.run()


def test_a_run_that_steps_down_to_the_grid_floor_names_the_devices_last_check(
    table, splits, tmp_path, monkeypatch  # type: ignore[no-untyped-def]
) -> None:
    # The same, reached after grid steps: the error quotes the check made at the floor (the
    # ratio to the original with its interval, the aim, the decision), not a stale figure.
    monkeypatch.setattr("host.engine.netadapt.choose_proposals", lambda *a, **k: [])
    widest = max(g.channels for g in _network().groups)
    engine = small_engine(_calibrated(table), splits, tmp_path / "run",
                          _config(budget=Budget(fraction=0.05), step=widest // 2,
                                  short_term_steps=1))
    monkeypatch.setattr(engine, "_initial_target", lambda budget, original: (0.0, None))
    with pytest.raises(BudgetUnreachable) as caught:
        engine.run()
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert lines, "at least one grid step before the floor"
    last = json.loads(lines[-1])
    assert last["grid_step"] and last["budget_check"]["decision"].startswith("missed")
    assert (f"ratio to original {last['budget_check']['value']:.4f}" in str(caught.value)
            and "against the aim 0.0490" in str(caught.value)
            and f"on the {widest // 2}-channel grid" in str(caught.value)), caught.value


def test_a_table_that_puts_the_original_within_budget_does_not_measure_it_against_itself(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    # A calibration fitted on tiny, overhead-bound networks can put the original's estimate
    # below the budget (seen in CI). The original was measured when the budget was set: the
    # engine aims below its estimate by the measured miss instead of measuring it against
    # itself, and every budget check it reports is a record in history.jsonl.
    pool, store, est = table
    low = LatencyEstimator(store.load_values(), 0.1 * est.overhead_ms,
                           Correction(c_sum=0.1, c_units=0.0, samples=4), fetch=est.fetch)
    engine = small_engine((pool, store, low), splits, tmp_path / "run", _config())
    lines = io.StringIO()
    engine.progress = Progress(lines, tty=False)
    measured: list[list[torch.nn.Module]] = []
    measure = engine._measure

    def recording(models, settled=None):  # type: ignore[no-untyped-def]
        measured.append(list(models))
        return measure(models, settled)

    engine._measure = recording  # type: ignore[method-assign]
    result = engine.run()
    full_ms = engine._estimate(engine.network.full_config())
    assert full_ms < BUDGET_FRACTION * result.original_latency_ms
    candidates = [models[-1] for models in measured[1:]]  # [0]: the original, for the budget
    assert all(m is not engine.network.model for m in candidates[:-1])  # [-1]: the final pass
    checks = [r.budget_check for r in result.history if r.budget_check]
    printed = [x for x in lines.getvalue().splitlines() if x.startswith("budget check at ")]
    assert checks and len(printed) == len(checks)
    assert not any(x.startswith("budget check at iteration 0:") for x in printed)
    # The progress line says what history.jsonl records, in the words errors use (a check
    # of the network iteration i made is printed as iteration i + 1's).
    recorded = [f"budget check at iteration {r.iteration + 1}: "
                f"{describe_check(r.budget_check)}"
                for r in result.history if r.budget_check]
    assert printed == recorded
    assert _met(checks[-1]) and checks[-1]["limit"] == BUDGET_FRACTION


def test_an_absolute_budget_the_original_already_meets_prunes_nothing(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    engine = _engine(table, splits, tmp_path / "run", _config(budget=Budget(ms=10.0)))
    result = engine.run()
    assert result.original_latency_ms < 10.0  # the premise: the original is within it
    assert result.iterations == 0 and result.history == []
    assert sum(p.numel() for p in engine.final_model.parameters()) == sum(
        p.numel() for p in engine.network.model.parameters())
    assert result.budget_met


def test_a_budget_check_is_met_only_when_its_interval_clears_the_aim() -> None:
    # The budget is a constraint: a median under the aim with the interval straddling it is a
    # miss by the interval's upper end (3 of 6 bench runs stopped on such medians, one to end
    # 6.5% past its budget), and the aim lies the margin below the budget.
    aim = 0.5 * (1 - 0.02)
    assert budget_decision(Figure(0.47, 0.46, 0.48, 12, True), aim) == ("met", 0.47 / aim)
    assert budget_decision(Figure(0.49, 0.485, aim, 12, True), aim)[0] == "met"
    decision, over = budget_decision(Figure(0.486, 0.470, 0.500, 48, False), aim)
    assert decision == "missed at cap (interval straddles)" and over == 0.5 / aim > 1
    # Within the budget but above the aim, tightly: a miss the engine prunes past.
    decision, over = budget_decision(Figure(0.495, 0.493, 0.497, 12, True), aim)
    assert decision == "missed" and over == pytest.approx(0.495 / aim) and over > 1


def test_a_budget_check_stops_the_run_only_on_a_tight_interval_below_the_aim() -> None:
    # The eleventh day's run 4: met on six passes beside the neighbour, 0.435 [0.366, 0.479],
    # then 0.487 in the final pass. Below the aim but wide: measure on, up to the cap.
    aim = 0.5 * (1 - 0.02)
    assert not budget_settled(Figure(0.435, 0.366, 0.479, 6, False), aim)
    assert budget_settled(Figure(0.47, 0.465, 0.476, 14, True), aim)
    # A miss settles on any interval clear above the aim: the next step checks again.
    assert budget_settled(Figure(0.60, 0.52, 0.70, 6, False), aim)
    assert not budget_settled(Figure(0.486, 0.470, 0.500, 20, False), aim)
    assert not budget_settled(Figure(0.488, 0.484, 0.492, 30, True), aim)
    # At the cap the decision takes the interval as it is: below the aim is met.
    assert budget_decision(Figure(0.435, 0.366, 0.479, 48, False), aim)[0] == "met"


def test_checks_every_5_percent_count_from_the_checkpoint_not_from_history_jsonl() -> None:
    # history.jsonl records a check at once; the checkpoint only with the next step. A run
    # interrupted after a check that met must check that network again on resume.
    def record(i: int, est: float, measured: float | None) -> IterationRecord:
        return IterationRecord(i, 0, "g", {}, 0.0, est, est, measured, 0.9, 0.9, [], {})
    history = [record(0, 1.0, None), record(1, 0.9, 0.8), record(2, 0.8, None),
               record(3, 0.7, 0.6)]
    assert last_measured_estimate({}, history) is None
    assert last_measured_estimate({2: 0.8}, history) == 0.9   # network 4's check not saved
    assert last_measured_estimate({2: 0.8, 4: 0.6}, history) == 0.7
    assert last_measured_estimate({9: 0.5}, history) is None   # its record was removed


def test_a_miss_on_a_flat_table_moves_the_target_along_the_secant_not_below_the_grid() -> None:
    # Seen in CI: a table whose ratios ran flatter than the device's (the whole grid within
    # 0.1% of the original's estimate, the smallest network measured at 0.30 of the original)
    # missed a 0.6 budget by 16% at an estimate of 79.60 ms. Dividing the target by the miss
    # put it at 68.6 ms, below every network on the grid: no check was made again and the run
    # ended "no layer can be pruned further". The target is read from the secant instead.
    full, small_est, small_ratio = 79.69, 79.56, 0.2954
    state = _State(5, torch.nn.Identity(), {}, 1.0, 0.6, 79.6119, 0.9, {},
                   (small_est, small_ratio))
    estimate, over = 79.60, 1.16
    target = NetAdapt._retarget(state, estimate, over, 0.6)
    assert small_est < target < estimate
    ratio = over * 0.6
    # On the secant through (estimate, measured ratio) and the smallest network, the new
    # target is where the ratio reaches the budget.
    at_target = small_ratio + (ratio - small_ratio) * (target - small_est) / (estimate - small_est)
    assert at_target == pytest.approx(0.6)
    assert target < full
    # The aim (the budget less its margin) is where the secant is read.
    lower = NetAdapt._retarget(state, estimate, over * 0.6 / 0.588, 0.588)
    assert small_est < lower < target
    # A noisy figure below the smallest network's: aim at the smallest, never past it.
    assert NetAdapt._retarget(state, 79.55, 1.01, 0.6) == pytest.approx(79.55)
    assert NetAdapt._retarget(state, estimate, 0.2 / 0.6, 0.6) == pytest.approx(small_est)
    # Estimates proportional to the device's figures (no line drawn) scale by the miss.
    plain = _State(5, torch.nn.Identity(), {}, 1.0, 0.6, 10.0, 0.9, {})
    assert NetAdapt._retarget(plain, 9.5, 1.1, 0.6) == pytest.approx(9.5 / 1.1)
    assert NetAdapt._retarget(plain, 10.5, 1.1, 0.6) == pytest.approx(10.0 / 1.1)


def test_the_last_step_is_clipped_to_what_is_left_to_the_budget(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    engine = _engine(table, splits, tmp_path / "run", _config(initial_reduction=0.1))
    full = engine.network.full_config()
    original = engine.metric(engine.network.specs(full))
    estimate = engine._estimate(full)
    state = _State(0, engine.network.model, full, 1.0, 0.6, estimate, 1.0, {})
    # 1% left to go: a 1% step, not the schedule's 10% one.
    state.estimate_target_ms = 0.99 * estimate
    assert engine._reduction_target(state, estimate, original) == pytest.approx(0.01 * original)
    # Far from the budget: the schedule (initial reduction x the original's metric x decay^i).
    state.estimate_target_ms = 0.5 * estimate
    state.iteration = 2
    assert engine._reduction_target(state, estimate, original) == pytest.approx(
        0.1 * original * engine.config.decay ** 2)
    # At or below the target (a measured miss not yet turned into a tighter target): the schedule.
    state.estimate_target_ms = estimate
    assert engine._reduction_target(state, estimate, original) == pytest.approx(
        0.1 * original * engine.config.decay ** 2)


def _met(check: dict[str, object]) -> bool:
    """Met: the interval at or below the aim, the budget less its margin. An interval that
    still straddles the aim at the round cap is a miss (the budget is a constraint)."""
    high, limit, aim = (float(check[k]) for k in ("high", "limit", "aim"))  # type: ignore[arg-type]
    return check["decision"] == "met" and high <= aim < limit and _holds_its_passes(check)


def _holds_its_passes(check: dict[str, object]) -> bool:
    """The record keeps every pass it was decided on, and its figure is their 10th percentile
    (of the candidate's over the original's, for a ratio)."""
    passes: list[list[float]] = check["passes_ms"]  # type: ignore[assignment]
    value = (_tenth(passes[-1]) / _tenth(passes[0])
             if check["figure"] == "ratio to original" else _tenth(passes[-1]))
    return len(passes[-1]) == check["rounds"] and value == pytest.approx(check["value"])


def _tenth(values: list[float]) -> float:
    """numpy's, not the code under test's: a figure is the 10th percentile of its passes."""
    return float(np.quantile(values, 0.1))


def _records(path: Path) -> list[tuple[int, dict[str, int], float]]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        out.append((d["group_id"], d["channels"], d["holdout_accuracy"]))
    return out


def test_resume_gives_the_same_run_as_no_interruption(table, splits, tmp_path
                                                      ) -> None:  # type: ignore[no-untyped-def]
    # An unreachable-looking tight budget with a cap on iterations: both runs take exactly
    # three steps, so the comparison does not depend on measurement noise.
    config = _config(budget=Budget(ms=1e-3), max_iterations=3)
    whole = _engine(table, splits, tmp_path / "a", config)
    whole.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    whole.run()

    def interrupt(record: IterationRecord) -> None:
        if record.iteration == 0:
            raise KeyboardInterrupt

    first = _engine(table, splits, tmp_path / "b", config, on_iteration=interrupt)
    first.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert len(_records(tmp_path / "b" / "history.jsonl")) == 1
    resumed = _engine(table, splits, tmp_path / "b", config)
    resumed.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    resumed.run(resume=True)
    assert _records(tmp_path / "a" / "history.jsonl") == _records(tmp_path / "b" / "history.jsonl")
    for a, b in zip(whole.final_model.state_dict().values(),
                    resumed.final_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_checkpoints_are_data_and_pickled_models_are_refused(table, splits, tmp_path
                                                              ) -> None:  # type: ignore[no-untyped-def]
    config = _config(budget=Budget(ms=1e-3), max_iterations=1)
    engine = _engine(table, splits, tmp_path / "run", config)
    engine.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    engine.run()
    state_file = tmp_path / "run" / "checkpoints" / "state.pt"
    # Only tensors, numbers and strings: readable without running any code from the file.
    data = torch.load(state_file, weights_only=True)
    assert data["format"] == "netadapt-run-state" and data["iteration"] == 1
    assert all(isinstance(v, torch.Tensor) for v in data["model_state"].values())
    assert json.loads(data["adapt_config"])["seed"] == config.seed
    iteration_file = tmp_path / "run" / "checkpoints" / "iter_001.pt"
    assert torch.load(iteration_file, weights_only=True)["channels"] == data["channels"]
    # A run folder from before (a pickled model inside) is refused, saying what to do.
    torch.save({"iteration": 1, "model": engine.final_model}, state_file)
    with pytest.raises(CheckpointError, match="pickled model .* --overwrite"):
        _engine(table, splits, tmp_path / "run", config).run(resume=True)


def test_worker_pool_gives_the_sequential_result(table, splits, tmp_path
                                                 ) -> None:  # type: ignore[no-untyped-def]
    config = _config(budget=Budget(ms=1e-3), max_iterations=1)
    runs = []
    for workers in (1, 2):
        engine = _engine(table, splits, tmp_path / f"w{workers}",
                         _config(budget=config.budget, max_iterations=1, workers=workers))
        engine.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
        engine.run()
        runs.append(json.loads((tmp_path / f"w{workers}" / "history.jsonl").read_text()))
    assert runs[0]["proposals"] == runs[1]["proposals"]
    assert runs[0]["channels"] == runs[1]["channels"]


def test_unreachable_budget_names_the_best_reachable_and_leaves_nothing(
    table, splits, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    engine = _engine(table, splits, tmp_path / "run", _config(budget=Budget(ms=1e-4)))
    with pytest.raises(BudgetUnreachable, match="cannot be reached: .* the table estimates"):
        engine.run()
    assert not (tmp_path / "run").exists()


def test_proposals_take_the_fewest_filters_that_meet_the_target() -> None:
    from host.graph.groups import PrunableGroup

    g = PrunableGroup(0, "conv", 32, ("conv",), ("conv",), (0,), ())
    # Latency not monotonic in channels: 24 is slower than 32, 16 is the first real cut.
    cost = {32: 1.0, 24: 1.2, 16: 0.7, 8: 0.5}
    picks = choose_proposals([g], {0: 32}, lambda c: [c[0]],  # type: ignore[arg-type,return-value]
                             lambda specs: cost[specs[0]], target=0.2, step=8)  # type: ignore[index]
    assert [(p.n_keep, p.meets_target) for p in picks] == [(16, True)]
    fallback = choose_proposals([g], {0: 32}, lambda c: [c[0]],  # type: ignore[arg-type,return-value]
                                lambda specs: cost[specs[0]], target=0.9, step=8)  # type: ignore[index]
    assert [(p.n_keep, p.meets_target) for p in fallback] == [(8, False)]


def test_grid_steps_take_one_step_per_group_whatever_the_table_says() -> None:
    from host.graph.groups import PrunableGroup

    a = PrunableGroup(0, "a", 32, ("a",), ("a",), (0,), ())
    b = PrunableGroup(1, "b", 16, ("b",), ("b",), (1,), ())
    flat = {(24, 16): 1.0, (32, 8): 1.01, (32, 16): 1.0}  # no step saves anything
    steps = grid_steps([a, b], {0: 32, 1: 16},
                       lambda c: [(c[0], c[1])],  # type: ignore[arg-type,return-value]
                       lambda specs: flat[specs[0]], step=8)  # type: ignore[index]
    assert [(p.group_id, p.n_keep, p.meets_target, p.partial) for p in steps] == [
        (0, 24, False, True), (1, 8, False, True)]
    assert steps[1].reduction < 0  # the table's figure is kept, not made up
    # At the floor of the grid there is no step left.
    assert grid_steps([a, b], {0: 8, 1: 8}, lambda c: [], lambda specs: 0.0, step=8) == []


def _cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    return host_main(list(argv), out=out, err=err), err.getvalue()


def test_cli_refuses_a_checkpoint_of_another_model(daemon: RunningServer, tmp_path: Path
                                                   ) -> None:
    from host.models.registry import build_model_for

    ckpt = tmp_path / "tiny.pt"
    torch.save(build_model_for("tiny_cnn", (1, 8, 8), 10).state_dict(), ckpt)
    code, err = _cli("adapt", "--model", "mobilenet_v1", "--data", "digits", "--checkpoint",
                     str(ckpt), "--device", daemon.address, "--workdir", str(tmp_path / "run"),
                     "--lut", str(tmp_path / "t.sqlite"))
    assert code == 2 and "does not match mobilenet_v1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_table_of_another_device(daemon: RunningServer, tmp_path: Path) -> None:
    ckpt, table = tiny_checkpoint_and_foreign_table(tmp_path)
    code, err = _cli("adapt", "--model", "tiny_cnn", "--data", "digits", "--checkpoint",
                     str(ckpt), "--device", daemon.address, "--workdir", str(tmp_path / "run"),
                     "--lut", str(table))
    assert code == 1 and "device_fingerprint" in err
    assert not (tmp_path / "run").exists()


def test_chance_level_is_two_standard_errors_above_guessing() -> None:
    from host.training import at_chance

    assert at_chance(0.10, 10, 500) and at_chance(0.126, 10, 500)  # 0.1 + 2 * 0.0134
    assert not at_chance(0.13, 10, 500) and not at_chance(0.9, 10, 500)
    assert not at_chance(0.126, 10, 5000)  # more samples: a tighter chance band
    with pytest.raises(ValueError, match="2 classes"):
        at_chance(0.5, 1, 500)


def test_cli_warns_of_an_untrained_base_before_the_expensive_work(
        daemon: RunningServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A base at chance is named before calibration and the table (here refused as another
    device's, which ends the command, so the warning came first); a trained base passes
    without it."""
    from host.data import load_dataset
    from host.models.registry import build_model_for
    from host.training import TrainConfig, at_chance, evaluate, train

    splits = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    untrained = build_model_for("tiny_cnn", splits.input_shape, splits.num_classes)
    assert at_chance(evaluate(untrained, splits.holdout), 10, len(splits.holdout))
    trained = build_model_for("tiny_cnn", splits.input_shape, splits.num_classes)
    train(trained, splits.train, TrainConfig(epochs=5, lr=5e-3), progress=False)
    assert evaluate(trained, splits.holdout) > 0.5
    _, table = tiny_checkpoint_and_foreign_table(tmp_path)
    for name, model in (("untrained", untrained), ("trained", trained)):
        ckpt = tmp_path / f"{name}.pt"
        torch.save(model.state_dict(), ckpt)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="host.cli.adapt"):
            code, err = _cli("adapt", "--model", "tiny_cnn", "--data", "digits", "--checkpoint",
                             str(ckpt), "--device", daemon.address, "--workdir",
                             str(tmp_path / "run"), "--lut", str(table))
        assert code == 1 and "device_fingerprint" in err, err
        warned = [r.getMessage() for r in caplog.records if "chance for 10" in r.getMessage()]
        if name == "untrained":
            assert len(warned) == 1 and f"checkpoint {ckpt}" in warned[0], warned
        else:
            assert not warned, warned
    assert not (tmp_path / "run").exists()


def test_cli_unreachable_device_fails_fast_and_writes_nothing(tmp_path: Path) -> None:
    code, err = _cli("adapt", "--model", "tiny_cnn", "--data", "digits", "--device",
                     "127.0.0.1:9", "--workdir", str(tmp_path / "run"))
    assert code == 1 and "127.0.0.1:9" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_random_seeds_are_per_proposal() -> None:
    from host.engine.proposals import proposal_seed

    seeds = {proposal_seed(0, i, g) for i in range(5) for g in range(5)}
    assert len(seeds) == 25 and proposal_seed(0, 1, 2) == proposal_seed(0, 1, 2)


def test_a_killed_host_leaves_no_proposal_workers_behind(tmp_path: Path) -> None:
    """A pool worker waits on a queue it holds both ends of: with its host SIGKILLed it must
    notice on its own and exit, not wait (holding its copy of the data) forever."""
    pid_file = tmp_path / "pids"
    code = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        import torch
        from torch.utils.data import TensorDataset
        from host.engine.executor import LocalPoolExecutor
        from host.engine.proposals import ProposalContext
        from host.training import TrainConfig
        data = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
        ctx = ProposalContext(data, data, (1, 1, 8, 8), "l1", 1, 1, TrainConfig(), 0)
        ex = LocalPoolExecutor(ctx, 2)
        pids = {{ex._pool.submit(os.getpid).result() for _ in range(8)}}
        Path({str(pid_file)!r}).write_text(" ".join(map(str, sorted(pids))))
        time.sleep(600)
        """
    )
    survivors = kill_host_and_find_survivors(code, pid_file, Path(__file__).resolve().parents[1],
                                             "workers", start_s=120)
    assert not survivors, f"still running: {survivors}"

