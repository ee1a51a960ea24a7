"""Every host failure in one line that says what broke and what to do, and nothing stored is
lost: a proposal worker SIGKILLed mid-proposal (the run names the signal, the proposal and that
`--resume` continues, and the resumed run is the uninterrupted one), the device lost mid-run, a
full disk (a real tmpfs filled up) while writing a checkpoint or a lookup-table row. (A Ray
task failing past its retries: tests/test_ray_executor.py, beside the Ray it needs.)"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from host.cli.netadapt_host import main as host_main
from host.data import DataSplits
from host.device.local_daemon import start_local_daemon
from host.device.table_builder import DriftGuard, build_table, identity_for
from host.engine.config import Budget
from host.engine.failures import DeviceLost, DiskFull, ProposalWorkerDied
from host.engine.netadapt import IterationRecord, NetAdapt
from lut.keys import plan_keys
from lut.store import LutDiskFull, LutStore
from tests.conftest import FAST_POLICY
from tests.helpers_engine import (
    SESSION,
    KillOnce,
    Table,
    small_config,
    small_engine,
    small_network,
    small_table,
)
from tests.helpers_failures import TmpfsUnavailable, fill, small_tmpfs

# Two iterations towards a budget nothing reaches: the same two steps every time, whatever the
# device's noise (the estimates come from the table, which the reference run fills).
CONFIG = small_config(budget=Budget(ms=1e-3), max_iterations=2)


def _engine(table: Table, splits: DataSplits, workdir: Path, **kw: Any) -> NetAdapt:
    config = small_config(budget=CONFIG.budget, max_iterations=2,
                          workers=kw.pop("workers", 1))
    engine = small_engine(table, splits, workdir, config, **kw)
    engine.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    return engine


def _history(workdir: Path) -> list[tuple[int, int, dict[str, int], float]]:
    out = []
    for line in (workdir / "history.jsonl").read_text().splitlines():
        d = json.loads(line)
        out.append((d["iteration"], d["group_id"], d["channels"], d["holdout_accuracy"]))
    return out


@pytest.fixture(scope="module")
def reference(table: Table, splits: DataSplits, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, NetAdapt]:
    """The uninterrupted run the interrupted ones must match."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    engine = _engine(table, splits, workdir)
    engine.run()
    return workdir, engine


def _same_model(a: NetAdapt, b: NetAdapt) -> None:
    for ta, tb in zip(a.final_model.state_dict().values(), b.final_model.state_dict().values(),
                      strict=True):
        assert torch.equal(ta, tb)


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    try:
        with small_tmpfs(tmp_path / "disk", size_kib=32 * 1024) as disk:
            yield disk
    except TmpfsUnavailable as exc:
        pytest.skip(f"a full disk is simulated with a small tmpfs, which needs root: {exc}")


# -- a proposal worker killed -------------------------------------------------------------------
def test_a_killed_worker_is_named_and_the_run_resumes_identically(
        table: Table, splits: DataSplits, reference: tuple[Path, NetAdapt],
        tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    poisoned = DataSplits(KillOnce(splits.train, marker), splits.holdout, splits.test,
                          splits.num_classes, splits.input_shape)
    workdir = tmp_path / "run"
    with pytest.raises(ProposalWorkerDied) as died:
        _engine(table, poisoned, workdir, workers=2).run()
    message = str(died.value)
    pid = int(marker.read_text())
    assert f"proposal worker pid {pid} was killed by SIGKILL" in message
    named = re.search(r"proposal of group (\d+) \((\S+) -> (\d+) channels\) in iteration 0",
                      message)
    assert named, message
    first = json.loads((reference[0] / "history.jsonl").read_text().splitlines()[0])
    assert {"group_id": int(named.group(1)), "n_keep": int(named.group(3))} in [
        {"group_id": p["group_id"], "n_keep": p["n_keep"]} for p in first["proposals"]]
    assert message.endswith(f"continue with --resume --workdir {workdir}")
    assert "\n" not in message
    resumed = _engine(table, poisoned, workdir)  # the marker is set: nobody dies again
    resumed.run(resume=True)
    assert _history(workdir) == _history(reference[0])
    _same_model(resumed, reference[1])


def test_adapt_cli_reports_a_killed_worker_in_one_line(daemon: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = tmp_path / "base.pt"
    torch.save(small_network().model.state_dict(), checkpoint)
    monkeypatch.setenv("NETADAPT_KILL_MARKER", str(tmp_path / "killed"))
    workdir = tmp_path / "run"
    out, err = io.StringIO(), io.StringIO()
    code = host_main(
        ["adapt", "--model", "mobilenet_v1", "--model-arg", "width_mult=0.25",
         "--data", "tests.helpers_failures:kill_once_splits", "--checkpoint", str(checkpoint),
         "--device", daemon.address, "--lut", str(tmp_path / "t.sqlite"), "--workdir",
         str(workdir), "--workers", "2", "--budget", "0.7", "--short-term-steps", "2",
         "--bn-batches", "2", "--long-term-epochs", "0", "--calibrate", "4", "--no-baseline"],
        out=out, err=err)
    text = err.getvalue()
    assert code == 1, text
    assert text.count("\n") == 1 and "Traceback" not in text and "internal error" not in text
    assert "killed by SIGKILL while evaluating the proposal of group" in text
    assert f"continue with --resume --workdir {workdir}" in text
    assert (workdir / "checkpoints" / "state.pt").exists()


# -- the device lost mid-run --------------------------------------------------------------------
def test_a_lost_device_names_it_and_the_run_resumes(splits: DataSplits, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    lut = tmp_path / "t.sqlite"
    with start_local_daemon() as first:
        table = small_table(first.address, lut)

        def lose_device(record: IterationRecord) -> None:
            if record.iteration == 0:
                first.stop()  # SIGTERM: the daemon goes away mid-run

        with pytest.raises(DeviceLost) as lost:
            _engine(table, splits, workdir, on_iteration=lose_device).run()
        table[0].close()
    message = str(lost.value)
    assert f"lost {first.address} mid-run (UNAVAILABLE" in message
    assert message.endswith(f"continue with --resume --workdir {workdir}")
    assert "\n" not in message
    with start_local_daemon() as second:
        table = small_table(second.address, lut)
        _engine(table, splits, workdir).run(resume=True)
        table[0].close()
    assert [r[0] for r in _history(workdir)] == [0, 1]


# -- a full disk --------------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_loses_nothing_and_resumes(
        table: Table, splits: DataSplits, reference: tuple[Path, NetAdapt], tmpfs: Path) -> None:
    workdir = tmpfs / "run"
    filler: list[Path] = []

    def fill_disk(record: IterationRecord) -> None:
        if record.iteration == 0:
            filler.append(fill(tmpfs))

    with pytest.raises(DiskFull) as full:
        _engine(table, splits, workdir, on_iteration=fill_disk).run()
    message = str(full.value)
    assert "No space left on device" in message and str(workdir) in message
    assert message.endswith(f"continue with --resume --workdir {workdir}")
    # The last checkpoint is whole (the one after iteration 0), no half-written file beside it,
    # and every history line parses (a line past the checkpoint is dropped on resume).
    state = torch.load(workdir / "checkpoints" / "state.pt", weights_only=True)
    assert state["iteration"] == 1
    assert not list((workdir / "checkpoints").glob("*.tmp"))
    assert [r[0] for r in _history(workdir)][:1] == [0]
    filler[0].unlink()
    resumed = _engine(table, splits, workdir)
    resumed.run(resume=True)
    assert _history(workdir) == _history(reference[0])
    _same_model(resumed, reference[1])


def test_a_full_disk_while_storing_lut_rows_loses_no_committed_row(
        table: Table, tmpfs: Path) -> None:
    pool = table[0]
    network = small_network()
    specs = list(plan_keys(network.planner, step=4).specs)
    committed: list[str] = []

    class Spy(LutStore):
        def put(self, spec_or_key: Any, timing: Any, kind: str = "unit", **kw: Any) -> None:
            super().put(spec_or_key, timing, kind, **kw)
            if kind == "unit":
                committed.append(spec_or_key.key())  # only once the commit returned

    path = tmpfs / "t.sqlite"
    Spy.open(path, identity_for(pool.info, SESSION)).close()
    filler = fill(tmpfs, leave_bytes=96 * 1024)
    with Spy.open(path, identity_for(pool.info, SESSION)) as store:
        with pytest.raises(LutDiskFull) as full:
            build_table(store, pool, specs, SESSION, policy=FAST_POLICY, progress=False)
    message = str(full.value)
    assert "the disk is full" in message and "run the same command again" in message
    assert len(committed) > 0
    kept = int(re.search(r"the (\d+) rows committed before are kept", message).group(1))
    with LutStore.open(path, create=False) as store:  # readable on the full disk
        assert store.keys() == set(committed)
        assert store.count() == kept  # units + the overhead row
    filler.unlink()
    with LutStore.open(path, identity_for(pool.info, SESSION)) as store:
        # No drift guard here: a reference that moves on a loaded machine re-measures a window
        # and counts it again, which is not what this test is about (committed rows are).
        report = build_table(store, pool, specs, SESSION, policy=FAST_POLICY, progress=False,
                             drift=DriftGuard(threshold=float("inf"), policy=FAST_POLICY))
        assert report.present == len(set(committed))
        assert report.measured == len(set(specs)) - len(set(committed))
        assert store.keys() == {s.key() for s in specs}


def _lut_build(address: str, path: Path) -> tuple[int, list[str], str]:
    out, err = io.StringIO(), io.StringIO()
    code = host_main(["lut", "build", "--device", address, "--model", "mobilenet_v1",
                      "--step", "4", "--lut", str(path), "--calibrate", "0"], out=out, err=err)
    text = err.getvalue()
    return code, [line for line in text.splitlines() if line.startswith("netadapt-host: ")], text


def test_lut_build_cli_on_a_full_disk_is_one_line(daemon: Any, tmpfs: Path) -> None:
    path = tmpfs / "t.sqlite"
    # Too full to even create the table: one line, and no damaged file left behind.
    filler = fill(tmpfs)
    code, lines, text = _lut_build(daemon.address, path)
    assert code == 1 and len(lines) == 1 and "Traceback" not in text, text
    assert "the disk is full while creating the table" in lines[0]
    assert not path.exists()
    filler.unlink()
    # Full midway through the rows.
    fill(tmpfs, leave_bytes=256 * 1024)
    code, lines, text = _lut_build(daemon.address, path)
    assert code == 1 and len(lines) == 1 and "Traceback" not in text, text
    assert "the disk is full" in lines[0] and "run the same command again" in lines[0]
    kept = int(re.search(r"the (\d+) rows committed before are kept", lines[0]).group(1))
    with LutStore.open(path, create=False) as store:
        assert store.count() == kept > 0


def test_lut_build_losing_its_device_is_one_line_and_keeps_its_rows(tmp_path: Path) -> None:
    import threading
    import time

    path = tmp_path / "t.sqlite"
    out, err = io.StringIO(), io.StringIO()
    with start_local_daemon() as daemon:

        def stop_midway() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    with LutStore.open(path, create=False, check=False) as store:
                        if store.count("unit") >= 50:
                            break
                except Exception:  # not created yet
                    pass
                time.sleep(0.1)
            daemon.stop()

        stopper = threading.Thread(target=stop_midway)
        stopper.start()
        code = host_main(["lut", "build", "--device", daemon.address, "--model",
                          "mobilenet_v1", "--step", "4", "--lut", str(path), "--calibrate",
                          "0"], out=out, err=err)
        stopper.join()
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("netadapt-host: ")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in text, text
    assert daemon.address in lines[0] and "run the same command again" in lines[0]
    kept = int(re.search(r"the (\d+) rows in \S+ are kept", lines[0]).group(1))
    with LutStore.open(path, create=False) as store:
        assert store.count("unit") == kept >= 50
