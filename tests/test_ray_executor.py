"""Proposals as Ray tasks on a local Ray started inside the test (its session files in the
test's temporary folder): the same results as the local executors, a worker killed mid-task is
retried, and the CLI says how to install Ray when it is missing."""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from host.cli.netadapt_host import main as host_main
from host.data import DataSplits
from host.engine.config import Budget
from host.engine.executor import SequentialExecutor
from host.engine.proposals import ProposalContext, ProposalResult, choose_proposals
from host.engine.ray_executor import RayExecutor
from host.training import TrainConfig
from tests.helpers_engine import (
    KillOnce,
    Table,
    small_config,
    small_engine,
    small_network,
)

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # A short folder: Ray's unix sockets live under it and their paths are length-limited.
    # Ray's auth token goes there too, not to ~/.ray.
    temp = tempfile.mkdtemp(prefix="ray-")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    _start_ray(temp)
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_ray(temp: str, attempts: int = 3) -> None:
    """Ray gives its raylet a fixed 30 s to register (ray/_private/node.py); on a loaded 2-core
    machine that can pass. Try again from a clean start, then fail with Ray's own log tails."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp,
                     object_store_memory=200 * 1024**2,
                     runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
            return
        except Exception as error:
            ray.shutdown()
            if attempt < attempts and "timed out during startup" in str(error):
                continue
            logs = sorted(Path(temp).glob("session_*/logs/*"))
            tails = "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                for p in logs if p.suffix in (".out", ".err", ".log") and p.stat().st_size)
            raise RuntimeError(f"Ray did not start ({attempt} tries): {error}\n{tails}") from error


def _context(splits: DataSplits, train: object = None) -> ProposalContext:
    return ProposalContext(train or splits.train, splits.holdout, (1, 1, 28, 28),  # type: ignore[arg-type]
                           "l2", short_term_steps=3, bn_batches=2,
                           train_config=TrainConfig(epochs=1, batch_size=32, seed=1), seed=1)


def _proposals(table: Table) -> list:  # type: ignore[type-arg]
    net = small_network()
    _, _, est = table
    full = net.full_config()
    target = 0.05 * est.estimate(net.specs(full))
    return choose_proposals(net.groups, full, net.specs, est.estimate, target, 8)[:4]


def _same(a: list[ProposalResult], b: list[ProposalResult]) -> None:
    assert [r.proposal for r in a] == [r.proposal for r in b]
    assert [r.holdout_accuracy for r in a] == [r.holdout_accuracy for r in b]
    for ra, rb in zip(a, b, strict=True):
        for ta, tb in zip(ra.model.state_dict().values(), rb.model.state_dict().values(),
                          strict=True):
            assert torch.equal(ta, tb)


def test_ray_tasks_give_the_sequential_results(local_ray, table, splits  # type: ignore[no-untyped-def]
                                               ) -> None:
    proposals = _proposals(table)
    assert len(proposals) >= 2
    model = small_network().model
    expected = SequentialExecutor(_context(splits)).run(model, proposals, 0)
    done: list[ProposalResult] = []
    executor = RayExecutor(_context(splits))
    try:
        got = executor.run(model, proposals, 0, on_done=done.append)
    finally:
        executor.close()
    assert ray.is_initialized()  # it joined the test's Ray, so it must not shut it down
    assert len(done) == len(proposals)
    _same(expected, got)


def test_a_worker_killed_mid_task_is_retried(local_ray, table, splits, tmp_path  # type: ignore[no-untyped-def]
                                             ) -> None:
    proposals = _proposals(table)[:2]
    model = small_network().model
    expected = SequentialExecutor(_context(splits)).run(model, proposals, 0)
    marker = tmp_path / "killed"
    executor = RayExecutor(_context(splits, KillOnce(splits.train, marker)))
    try:
        got = executor.run(model, proposals, 0)
    finally:
        executor.close()
    killed_pid = int(marker.read_text())
    assert killed_pid != os.getpid()  # a Ray worker died, SIGKILLed while fine-tuning
    _same(expected, got)


def test_a_small_adaptation_on_ray_matches_the_local_run(local_ray, table, splits, tmp_path  # type: ignore[no-untyped-def]
                                                         ) -> None:
    runs = []
    for name, kw in (("local", {"workers": 1}), ("ray", {"executor": "ray"})):
        engine = small_engine(table, splits, tmp_path / name,
                              small_config(budget=Budget(ms=1e-3), max_iterations=2, **kw))
        engine.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
        engine.run()
        runs.append([json.loads(line) for line in
                     (tmp_path / name / "history.jsonl").read_text().splitlines()])
    assert len(runs[0]) == 2
    for a, b in zip(*runs, strict=True):
        assert (a["proposals"], a["channels"], a["holdout_accuracy"]) == \
               (b["proposals"], b["channels"], b["holdout_accuracy"])


def test_cli_without_ray_says_how_to_install_it(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    err = io.StringIO()
    code = host_main(["adapt", "--model", "tiny_cnn", "--data", "digits", "--executor", "ray",
                      "--workdir", str(tmp_path / "run")], out=io.StringIO(), err=err)
    assert code == 2
    assert "pip install 'netadapt[ray]'" in err.getvalue() and "Traceback" not in err.getvalue()
    assert not (tmp_path / "run").exists()


def test_gpus_per_proposal_needs_the_ray_executor(tmp_path: Path) -> None:
    err = io.StringIO()
    code = host_main(["adapt", "--model", "tiny_cnn", "--data", "digits",
                      "--gpus-per-proposal", "0.5", "--workdir", str(tmp_path / "run")],
                     out=io.StringIO(), err=err)
    assert code == 2 and "needs --executor ray" in err.getvalue()


def test_a_task_failing_past_its_retries_names_the_proposal(local_ray, table, splits  # type: ignore[no-untyped-def]
                                                            ) -> None:
    from host.engine.failures import ProposalTaskFailed, run_failures
    from tests.helpers_failures import KillAlways

    proposal = _proposals(table)[0]
    executor = RayExecutor(_context(splits, KillAlways(splits.train)), max_retries=1)
    try:
        # A run whose first checkpoint exists (this file stands for it): --resume continues.
        with pytest.raises(ProposalTaskFailed) as failed, \
                run_failures(Path("runs/x"), Path(__file__)):
            executor.run(small_network().model, [proposal], 4)
    finally:
        executor.close()
    message = str(failed.value)
    assert "\n" not in message
    assert (f"the Ray task for the proposal of group {proposal.group_id} ({proposal.root} -> "
            f"{proposal.n_keep} channels) in iteration 4 failed after 1 retries") in message
    assert message.endswith("continue with --resume --workdir runs/x")
