"""Where an iteration's proposals run: in this process, in a local pool of worker processes,
or as tasks on a Ray cluster (`host.engine.ray_executor`). Proposals are independent and each
fixes its own seed and thread count, so every executor gives the same results; the others only
give them sooner."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from torch import nn

from host.engine.config import AdaptConfig
from host.engine.proposals import Proposal, ProposalContext, ProposalResult, evaluate_proposal

__all__ = ["Executor", "SequentialExecutor", "LocalPoolExecutor", "make_executor"]

OnDone = Callable[[ProposalResult], None]

_worker_ctx: ProposalContext | None = None


def _init_worker(ctx: ProposalContext) -> None:
    global _worker_ctx
    _worker_ctx = ctx


def _run_in_worker(model: nn.Module, proposal: Proposal, iteration: int) -> ProposalResult:
    assert _worker_ctx is not None, "worker started without its context"
    return evaluate_proposal(model, proposal, iteration, _worker_ctx)


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


class LocalPoolExecutor(Executor):
    """Worker processes started once per run (spawned: safe beside gRPC threads), each holding
    the data once; a task carries only the model and the proposal."""

    def __init__(self, ctx: ProposalContext, workers: int) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(ctx,),
        )

    def run(self, model: nn.Module, proposals: Sequence[Proposal], iteration: int,
            on_done: OnDone | None = None) -> list[ProposalResult]:
        futures = [self._pool.submit(_run_in_worker, model, p, iteration) for p in proposals]
        results = []
        for f in futures:  # in proposal order, so the choice is independent of timing
            r = f.result()
            results.append(r)
            if on_done is not None:
                on_done(r)
        return results

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
