"""Plans before work: the streamed key plan is exactly what enumerating every configuration
through the planner gives; a plan beyond `--max-keys` is refused quickly, in bounded memory,
with its size and the finest grid that fits; `lut build` and an on-demand `adapt` say how many
keys they will measure and how long the device will take, before measuring."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from host.cli.lut import announce_on_demand
from host.cli.netadapt_host import main as host_main
from host.graph.groups import ChannelPlanner
from host.network import load_network
from lut.keys import PlanTooLarge, candidate_counts, plan_keys, unit_dependencies
from tests.helpers_engine import SESSION, small_network

ROOT = Path(__file__).resolve().parents[1]


def _enumerated(planner: ChannelPlanner, step: int) -> tuple[tuple[Any, ...], int]:
    """The plan as it was built before streaming: every configuration through the planner."""
    base = {g.id: g.channels for g in planner.groups}
    cands = {g.id: candidate_counts(g.channels, step) for g in planner.groups}
    seen: dict[Any, None] = {}
    entries = 0
    for index, deps in enumerate(unit_dependencies(planner)):
        for combo in itertools.product(*(cands[g] for g in deps)):
            config = dict(base)
            config.update(zip(deps, combo, strict=True))
            seen.setdefault(planner.specs(config)[index], None)
            entries += 1
    return tuple(seen), entries


@pytest.mark.parametrize(("model", "shape"), [("mobilenet_v1", (1, 1, 28, 28)),
                                              ("mobilenet_v2", (1, 3, 32, 32)),
                                              ("mobilenet_v3_small", (1, 3, 64, 64))])
def test_the_streamed_plan_is_the_enumerated_one(model: str, shape: tuple[int, ...]) -> None:
    net = load_network(model, shape, 10)
    for step in ((8, 16) if model == "mobilenet_v1" else (16,)):
        plan = plan_keys(net.planner, step=step)
        fresh = ChannelPlanner(net.planner.units, net.planner.groups)  # its own caches
        specs, entries = _enumerated(fresh, step)
        assert plan.specs == specs and plan.entries == entries
        assert len(plan) < entries  # repeated blocks share keys


def test_a_plan_over_the_limit_is_refused_with_its_size_and_a_grid_that_fits() -> None:
    planner = small_network().planner
    full = plan_keys(planner, step=2)
    limit = len(full) - 1
    with pytest.raises(PlanTooLarge) as refused:
        plan_keys(planner, step=2, max_keys=limit)
    error = refused.value
    assert error.at_least > limit and error.entries == full.entries
    coarser = next(s for s in (4, 8, 16) if len(plan_keys(planner, step=s)) <= limit)
    assert error.fits == (coarser, len(plan_keys(planner, step=coarser)))
    assert f"use --step {coarser}" in str(error) and "--max-keys" in str(error)
    assert plan_keys(planner, step=2, max_keys=len(full)).specs == full.specs


_PLAN_STEP_1 = """
import re, sys
from host.cli.netadapt_host import main
code = main(["lut", "build", "--model", "mobilenet_v1", "--input-shape", "1,3,224,224",
             "--num-classes", "1000", "--step", "1", "--device", "127.0.0.1:1"])
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child spawned from a large
# pytest process would report its parent's peak.
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print("peak_kib", peak, file=sys.stderr)
sys.exit(code)
"""


def test_step_1_on_mobilenet_v1_at_224_is_refused_in_bounded_memory() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", _PLAN_STEP_1], capture_output=True, text=True,
                          env=env, timeout=600)
    errors = [line for line in done.stderr.splitlines() if line.startswith("netadapt-host")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    # At least the largest unit's combinations (1024 x 1024 channels of the last 1x1 conv),
    # at most every (unit, combination) pair; and a grid that fits.
    net = load_network("mobilenet_v1", (1, 3, 224, 224), 1000)
    cands = {g.id: len(candidate_counts(g.channels, 1)) for g in net.planner.groups}
    deps = unit_dependencies(net.planner)
    largest = max(math.prod(cands[g] for g in d) for d in deps)
    entries = sum(math.prod(cands[g] for g in d) for d in deps)
    assert f"needs at least {largest:,} distinct keys (up to {entries:,}" in errors[0]
    assert "over the limit of 100,000 (--max-keys): use --step 4" in errors[0]
    # Nothing like the ~2 GB the enumeration reached: torch, the traced network and the plan.
    peak_mib = int(re.search(r"peak_kib (\d+)", done.stderr).group(1)) / 1024
    # Measured 392-449 MiB (torch and the traced network alone are 374 MiB).
    assert peak_mib < 1024, f"planning took {peak_mib:.0f} MiB"


def test_lut_build_says_how_many_keys_and_how_long_before_measuring(
        daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = host_main(["lut", "build", "--device", daemon.address, "--model", "tiny_cnn",
                      "--lut", str(tmp_path / "t.sqlite"), "--calibrate", "0", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    plan = report["plan"]
    assert plan["keys"] == report["distinct_keys"] and plan["present"] == 0
    assert plan["to_measure"] == plan["keys"] == report["measured"]
    assert plan["keys_per_s"] > 0 and plan["eta_s"] > 0 and plan["sampled"] > 0
    line = next(x for x in captured.err.splitlines() if "distinct keys" in x)
    assert re.search(rf"tiny_cnn at --step 8 \(planned in \d+\.\d s\): {plan['keys']} distinct "
                     rf"keys \({plan['entries']} entries\); 0 already in the table, "
                     rf"{plan['keys']} to measure: ~\d+ s at [\d.]+ keys/s", line), line
    # Again: everything is there, nothing to measure, no estimate needed.
    host_main(["lut", "build", "--device", daemon.address, "--model", "tiny_cnn",
               "--lut", str(tmp_path / "t.sqlite"), "--calibrate", "0", "--json"])
    again = json.loads(capsys.readouterr().out)["plan"]
    assert again["to_measure"] == 0 and again["sampled"] == 0


def test_an_on_demand_run_says_what_it_may_need(table: Any) -> None:
    pool, store, _ = table
    err = io.StringIO()
    before = store.count("unit")
    announce_on_demand(store, pool, small_network(), SESSION, 8, err)
    line = err.getvalue()
    keys = len(plan_keys(small_network().planner, step=8))
    assert f"may need up to {keys:,} keys, {before:,} already in the table" in line
    assert re.search(r"~\d+ ms each on this device", line) or before == keys
    assert store.count("unit") >= before  # the probe's keys are kept, not thrown away
    assert line.count("\n") == 1
