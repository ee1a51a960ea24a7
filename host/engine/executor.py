"""Where an iteration's proposals run: in this process, in a local pool of worker processes,
or as tasks on a Ray cluster (`host.engine.ray_executor`). Proposals are independent and each
fixes its own seed and thread count, so every executor gives the same results; the others only
give them sooner.

A local worker that dies (a signal: the OOM killer, a kill) breaks the pool; the executor then
says which worker died of what, and which proposal it was evaluating (each worker notes the
proposal it starts and finishes on a queue the executor reads), as a `ProposalWorkerDied`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.queues import SimpleQueue
from typing import Any

from torch import nn

from device_server.errors import describe_exit
from host.engine.config import AdaptConfig
from host.engine.failures import ProposalWorkerDied, describe_proposal
from host.engine.proposals import Proposal, ProposalContext, ProposalResult, evaluate_proposal

__all__ = ["Executor", "SequentialExecutor", "LocalPoolExecutor", "make_executor"]

log = logging.getLogger(__name__)

OnDone = Callable[[ProposalResult], None]

_worker_ctx: ProposalContext | None = None
_worker_notes: SimpleQueue[tuple[int, str, int]] | None = None


def _exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Ends this worker once its parent is gone. A pool worker waits on a queue whose write end
    it holds itself, so a host killed by a signal would leave it waiting forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _init_worker(ctx: ProposalContext, notes: SimpleQueue[tuple[int, str, int]]) -> None:
    global _worker_ctx, _worker_notes
    _exit_with_parent(os.getppid())
    _worker_ctx, _worker_notes = ctx, notes


def _run_in_worker(model: nn.Module, proposal: Proposal, iteration: int,
                   index: int) -> ProposalResult:
    assert _worker_ctx is not None and _worker_notes is not None, \
        "worker started without its context"
    _worker_notes.put((os.getpid(), "start", index))
    result = evaluate_proposal(model, proposal, iteration, _worker_ctx)
    _worker_notes.put((os.getpid(), "done", index))
    return result


class Executor:
    """Runs one iteration's proposals; returns their results in proposal order, calling
    `on_done` (progress) as each finishes, in whatever order they finish."""

    def run(self, model: nn.Module, proposals: Sequence[Proposal], iteration: int,
            on_done: OnDone | None = None) -> list[ProposalResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SequentialExecutor(Executor):
    def __init__(self, ctx: ProposalContext) -> None:
        self.ctx = ctx

    def run(self, model: nn.Module, proposals: Sequence[Proposal], iteration: int,
            on_done: OnDone | None = None) -> list[ProposalResult]:
        results = []
        for p in proposals:
            r = evaluate_proposal(model, p, iteration, self.ctx)
            results.append(r)
            if on_done is not None:
                on_done(r)
        return results


def _exit_codes(processes: dict[int, Any], wait_s: float = 2.0) -> dict[int, int | None]:
    """Exit codes of a broken pool's processes. The pool terminates the survivors as it breaks;
    a dead process may not be reapable the instant its pipe closes: poll briefly."""
    deadline = time.monotonic() + wait_s
    while True:
        codes = {pid: p.exitcode for pid, p in processes.items()}
        if all(c is not None for c in codes.values()) or time.monotonic() > deadline:
            return codes
        time.sleep(0.05)


class LocalPoolExecutor(Executor):
    """Worker processes started once per run (spawned: safe beside gRPC threads), each holding
    the data once; a task carries only the model and the proposal."""

    def __init__(self, ctx: ProposalContext, workers: int) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._notes: SimpleQueue[tuple[int, str, int]] = spawn.SimpleQueue()
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=spawn,
            initializer=_init_worker,
            initargs=(ctx, self._notes),
        )

    def run(self, model: nn.Module, proposals: Sequence[Proposal], iteration: int,
            on_done: OnDone | None = None) -> list[ProposalResult]:
        futures = [self._pool.submit(_run_in_worker, model, p, iteration, i)
                   for i, p in enumerate(proposals)]
        results = []
        try:
            for f in futures:  # in proposal order, so the choice is independent of timing
                r = f.result()
                results.append(r)
                if on_done is not None:
                    on_done(r)
        except BrokenProcessPool:
            raise self._worker_died(proposals, iteration) from None
        return results

    def _worker_died(self, proposals: Sequence[Proposal], iteration: int) -> ProposalWorkerDied:
        """Which worker died of what, and what it was doing, from the workers' notes and
        their exit codes (the pool SIGTERMs the survivors: a SIGTERM is blamed last)."""
        running: dict[int, int] = {}
        while not self._notes.empty():
            noted, event, index = self._notes.get()
            if event == "start":
                running[noted] = index
            else:
                running.pop(noted, None)
        processes: dict[int, Any] = getattr(self._pool, "_processes", None) or {}
        codes = _exit_codes(processes)
        dead = sorted((pid for pid, code in codes.items() if code is not None),
                      key=lambda pid: (codes[pid] == -signal.SIGTERM, pid not in running))
        pid: int | None = dead[0] if dead else None
        what = "a proposal worker" if pid is None else f"proposal worker pid {pid}"
        how = describe_exit(codes.get(pid) if pid is not None else None)
        if pid is not None and pid in running:
            doing = f"while evaluating the {describe_proposal(proposals[running[pid]], iteration)}"
        else:
            doing = f"during iteration {iteration}'s {len(proposals)} proposals"
        hint = " (out of memory? fewer --workers need less)" if how.endswith("SIGKILL") else ""
        log.error("%s %s %s; pool processes: %s", what, how, doing, codes)
        return ProposalWorkerDied(f"{what} {how} {doing}{hint}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_executor(ctx: ProposalContext, config: AdaptConfig) -> Executor:
    """The executor `config` asks for.

    Raises:
        RayUnavailable: `executor="ray"` without Ray installed (the message says how).
    """
    if config.executor == "ray":
        from host.engine.ray_executor import RayExecutor

        return RayExecutor(ctx, address=config.ray_address,
                           gpus_per_proposal=config.gpus_per_proposal)
    if config.workers <= 1:
        return SequentialExecutor(ctx)
    return LocalPoolExecutor(ctx, config.workers)
