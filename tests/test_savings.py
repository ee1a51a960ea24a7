"""What a proposal saves, measured on the device (issue 16): the units it changes timed beside
the units they replace, in interleaved passes on the real daemon, and the choice among the
leading proposals made on those savings rather than on the table's."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from device_server.server import RunningServer
from host.device.whole_model import Figure
from host.engine.netadapt import resolved_choice
from host.engine.proposals import Proposal, ProposalResult
from host.engine.savings import SavingsProtocol, changed_units, measure_savings
from host.training import score
from lut.keys import candidate_counts
from tests.helpers_engine import (
    SESSION,
    small_config,
    small_engine,
    small_network,
    small_splits,
    small_table,
)


def test_changed_units_are_what_a_proposal_removes_and_puts_in_their_place() -> None:
    net = small_network()
    full = net.full_config()
    for g in net.groups:
        smaller = [c for c in candidate_counts(g.channels, 8) if c < full[g.id]]
        if not smaller:
            continue
        before, after = net.specs(full), net.specs({**full, g.id: smaller[-1]})
        removed, added = changed_units(before, after)
        assert removed and added
        assert Counter(before) - Counter(removed) + Counter(added) == Counter(after)
        assert not set(removed) & set(added)
    assert changed_units(net.specs(full), net.specs(full)) == ([], [])


def test_a_large_cut_saves_measurably_and_an_unchanged_network_saves_nothing(
        daemon: RunningServer, tmp_path: Path) -> None:
    pool, _, est = small_table(daemon.address, tmp_path / "lut.sqlite")
    net = small_network()
    full = net.full_config()
    current = net.specs(full)

    def floor(g: Any) -> dict[int, int]:
        return {**full, g.id: candidate_counts(g.channels, 8)[0]}

    # The group the table says saves most when cut to the floor of the grid.
    group = max(net.groups, key=lambda g: est.estimate(current) - est.estimate(net.specs(floor(g))))
    cut = net.specs(floor(group))
    before = est.estimate(current)
    figures, passes = measure_savings(est, pool.clients[0], SESSION, current, [cut, current],
                                      SavingsProtocol(min_passes=6, max_passes=12))
    saved, nothing = figures
    assert 0 < saved.low <= saved.value <= saved.high and saved.rounds == passes.passes >= 6
    assert (nothing.value, nothing.low, nothing.high) == (0.0, 0.0, 0.0)  # no unit changed
    # Only the changed units were timed, each in every pass; the table is left as it was.
    removed, added = changed_units(current, cut)
    assert set(passes.specs) == set(removed) | set(added)
    assert all(set(p) == set(passes.specs) and min(p.values()) > 0 for p in passes.values)
    assert est.estimate(current) == before


def _result(group_id: int, reduction: float, loss: float) -> ProposalResult:
    p = Proposal(group_id, str(group_id), 8, {}, 1.0 - reduction, reduction, True)
    return ProposalResult(p, torch.nn.Identity(), 0.9, 0.9, 0.0, 0.0, 0.0, loss)


def test_a_saving_the_device_cannot_resolve_does_not_win_the_ranking() -> None:
    # From a loss of 0.20 both rise by 0.10; the table says group 0 saves twice as much.
    ranked = [_result(0, 0.10, 0.30), _result(1, 0.05, 0.30), _result(2, 0.01, 0.21)]
    straddles = Figure(0.02, -0.01, 0.05, 8, False)
    resolved = Figure(0.05, 0.04, 0.06, 8, True)

    def choice(savings: dict[int, Figure]) -> int:
        return resolved_choice(ranked, savings, 0.9, "loss-ratio", 0.20).proposal.group_id

    assert choice({0: straddles, 1: resolved}) == 1
    # Ranked again by the measured savings: 0.10 / 0.02 loses to 0.10 / 0.05.
    assert choice({0: Figure(0.02, 0.015, 0.025, 8, True), 1: resolved}) == 1
    assert choice({0: Figure(0.08, 0.07, 0.09, 8, True), 1: resolved}) == 0
    # Nothing resolved: the table's leader; a proposal not measured never wins on a saving.
    assert choice({0: straddles, 1: Figure(0.0, -0.02, 0.02, 8, False)}) == 0
    assert choice({}) == 0


def test_engine_chooses_among_the_leading_proposals_by_their_measured_savings(
        daemon: RunningServer, tmp_path: Path) -> None:
    table = small_table(daemon.address, tmp_path / "lut.sqlite")
    splits = small_splits()
    config = small_config(max_iterations=1, selection="loss-ratio", max_cut=0.5,
                          resolve_savings=3)
    engine = small_engine(table, splits, tmp_path / "run", config, original_ms=0.2)
    current_loss = score(engine.network.model, splits.holdout).loss
    result = engine.run()
    (record,) = result.history
    assert len(record.proposals) > 3

    def rank(p: dict[str, Any], saving: float) -> tuple[float, float, float, int]:
        return (max(p["holdout_loss"] - current_loss, 0.0) / saving, p["holdout_loss"],
                -p["reduction"], p["group_id"])

    by_table = sorted(record.proposals, key=lambda p: rank(p, p["reduction"]))
    measured = {p["group_id"]: p["saving_measured"] for p in record.proposals
                if p["saving_measured"] is not None}
    assert set(measured) == {p["group_id"] for p in by_table[:3]}  # the three leaders
    for f in measured.values():
        assert f["low"] <= f["value"] <= f["high"] and f["rounds"] >= 6
    resolved = [p for p in by_table[:3] if measured[p["group_id"]]["low"] > 0]
    expected = (min(resolved, key=lambda p: rank(p, measured[p["group_id"]]["value"]))
                if resolved else by_table[0])
    assert record.group_id == expected["group_id"]
    assert record.seconds["savings"] > 0 and engine.timings["savings_s"] > 0
