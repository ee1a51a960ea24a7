"""Proposals as Ray tasks: one short-term fine-tune and holdout evaluation per task, on
whatever CPUs (and GPUs) the cluster has.

The shared context (the data sets) is put in Ray's object store once per run and the model to
prune once per iteration; each task carries only references to them and its proposal. Table
look-ups stay on the driver. A task whose worker or node dies is retried by Ray (`max_retries`),
and since each proposal fixes its own seed, a retry gives the result the first try would have.
A task that still fails after its retries stops the run with a `ProposalTaskFailed` naming the
proposal and Ray's reason. Ray is an optional extra: without it, `--executor ray` says how to
install it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from host.engine.executor import Executor, OnDone
from host.engine.failures import ProposalTaskFailed, describe_proposal
from host.engine.proposals import Proposal, ProposalContext, ProposalResult, evaluate_proposal

__all__ = ["RayExecutor", "RayUnavailable", "RayClusterUnreachable", "import_ray"]

INSTALL_HINT = "pip install 'netadapt[ray]' (or pip install 'ray>=2.40')"


class RayUnavailable(ImportError):
    """`--executor ray` without Ray installed."""


class RayClusterUnreachable(ConnectionError):
    """`--ray-address` names no Ray cluster that answers."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--executor ray needs Ray, which is not installed: "
                             f"{INSTALL_HINT}; or use the local executor (--workers N)") from None
    return ray


def _evaluate_task(model: nn.Module, proposal: Proposal, iteration: int,
                   ctx: ProposalContext) -> ProposalResult:
    """Runs on a Ray worker; a GPU Ray assigned to this task is used, else the CPU."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return evaluate_proposal(model, proposal, iteration, ctx, device=device)


class RayExecutor(Executor):
    """Connects to `address` (or a running Ray), else starts Ray on this machine for the run."""

    def __init__(self, ctx: ProposalContext, address: str | None = None,
                 gpus_per_proposal: float = 0.0, cpus_per_proposal: float = 1.0,
                 max_retries: int = 3) -> None:
        ray = import_ray()
        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as exc:
                raise RayClusterUnreachable(
                    f"cannot reach the Ray cluster at {address}: {exc}; check --ray-address "
                    f"(the head's address printed by `ray start --head`)") from None
        self._ctx_ref = ray.put(ctx)  # the data sets cross to the object store once per run
        self.max_retries = max_retries
        self._task = ray.remote(_evaluate_task).options(
            num_cpus=cpus_per_proposal, num_gpus=gpus_per_proposal, max_retries=max_retries,
            retry_exceptions=False)  # a bug is not retried; a dead worker or node is

    def run(self, model: nn.Module, proposals: Sequence[Proposal], iteration: int,
            on_done: OnDone | None = None) -> list[ProposalResult]:
        ray = self._ray
        model_ref = ray.put(model)  # once per iteration, shared by its tasks
        refs = [self._task.remote(model_ref, p, iteration, self._ctx_ref) for p in proposals]
        index = {ref: i for i, ref in enumerate(refs)}
        results: dict[int, ProposalResult] = {}
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    i = index[ref]
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise self._failed(exc, proposals[i], iteration) from None
                    if on_done is not None:
                        on_done(results[i])
            return [results[i] for i in range(len(refs))]  # in proposal order
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def _failed(self, exc: BaseException, proposal: Proposal, iteration: int
                ) -> ProposalTaskFailed:
        """One line: which proposal, how often it was tried, Ray's reason (first lines)."""
        retried = self._ray.exceptions.RayTaskError
        cause = getattr(exc, "cause", None) if isinstance(exc, retried) else None
        if cause is not None:  # the task itself raised: not retried (it would raise again)
            reason = f"raised {type(cause).__name__}: {cause}"
        else:
            reason = f"failed after {self.max_retries} retries ({type(exc).__name__}: {exc})"
        text = " ".join(line.strip() for line in reason.splitlines() if line.strip())
        if len(text) > 400:
            text = text[:400] + "…"
        return ProposalTaskFailed(
            f"the Ray task for the {describe_proposal(proposal, iteration)} {text}")

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
