"""One NetAdapt step for one group: how many filters to remove (from the lookup table), and
what the pruned network is worth (surgery, BatchNorm re-estimation, short-term fine-tune,
holdout accuracy).

`choose_proposals` is pure and cheap (table look-ups only). `evaluate_proposal` is the expensive
part and is a top-level function of picklable arguments, so an executor can run it in another
process; it fixes its own seed and thread count, so where it runs does not change its result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from device_server.spec import LayerSpec
from host.graph.groups import PrunableGroup
from host.graph.surgery import prune_group
from host.training import TrainConfig, evaluate, fine_tune, recalibrate_batchnorm, score
from lut.keys import candidate_counts

__all__ = ["Proposal", "ProposalResult", "ProposalContext", "choose_proposals",
           "grid_steps", "evaluate_proposal", "proposal_seed"]


@dataclass(frozen=True)
class Proposal:
    group_id: int
    root: str
    n_keep: int
    config: dict[int, int]        # the whole network's channels if this proposal is taken
    metric_value: float           # the metric (e.g. estimated ms) after the proposal
    reduction: float              # metric before - after
    meets_target: bool
    partial: bool = False         # capped by `max_cut` short of the target (a partial step)


@dataclass(frozen=True)
class ProposalContext:
    """What every proposal of a run shares (sent to each worker once)."""

    train: Dataset[Any]
    holdout: Dataset[Any]
    input_shape: tuple[int, ...]
    importance: str
    short_term_steps: int
    bn_batches: int
    train_config: TrainConfig
    seed: int


@dataclass
class ProposalResult:
    proposal: Proposal
    model: nn.Module
    holdout_accuracy: float
    accuracy_after_bn: float      # before fine-tuning: what BN re-estimation alone recovers
    surgery_s: float
    finetune_s: float
    eval_s: float
    holdout_loss: float           # mean cross-entropy on holdout after fine-tuning, nats


def choose_proposals(
    groups: Sequence[PrunableGroup],
    config: Mapping[int, int],
    specs_for: Callable[[Mapping[int, int]], Sequence[LayerSpec]],
    metric: Callable[[Sequence[LayerSpec]], float],
    target: float,
    step: int,
    max_cut: float = 1.0,
    strict_cap: bool = False,
) -> list[Proposal]:
    """For every group, the fewest filters whose removal cuts the metric by >= `target`.

    Latency is not monotonic in channel count, so counts are tried in order of filters removed
    and the first that meets the target wins. A group that cannot meet it offers its largest
    cut instead (flagged `meets_target=False`), used only when no group meets the target.

    With `max_cut` < 1 no proposal removes more than that fraction of a group's current
    channels (at least one grid step): a group whose metric barely moves with its width, and
    would need a large cut to meet the target, offers a partial step instead (flagged
    `partial=True`) beside the groups that meet the target; the selection rule weighs them
    (e.g. accuracy lost per unit of the metric saved). Where no step within the cap reduces
    the metric at all, the group offers the smallest step beyond it that does (also partial,
    unless it meets the target), so a cap never makes a budget unreachable. With
    `strict_cap` such a group offers nothing instead: a budget the other groups cannot reach
    is then left to the engine's grid steps, checked on the device.
    """
    if not 0 < max_cut <= 1:
        raise ValueError(f"max_cut must be in (0, 1], got {max_cut}")
    current = metric(specs_for(config))
    out: list[Proposal] = []
    for g in groups:
        now = config[g.id]
        counts = [c for c in candidate_counts(g.channels, step) if c < now]
        floor = now - max(step, int(max_cut * now))  # fewest channels a capped step keeps
        best: Proposal | None = None
        capped: Proposal | None = None
        for n_keep in reversed(counts):
            beyond_cap = max_cut < 1 and n_keep < floor
            if beyond_cap and (best is not None or strict_cap):
                # Past the cap: the largest reduction within it (None under `strict_cap` when
                # nothing within it moved the metric: the group offers no step).
                capped = best
                break
            trial = dict(config)
            trial[g.id] = n_keep
            value = metric(specs_for(trial))
            reduction = current - value
            if reduction >= target:
                best = Proposal(g.id, g.root, n_keep, trial, value, reduction, True)
                break
            if reduction > 0 and beyond_cap:
                # Nothing within the cap moved the metric (a table is not monotonic in width):
                # the smallest step that does, so the cap never walls a group off.
                capped = Proposal(g.id, g.root, n_keep, trial, value, reduction, False)
                break
            if reduction > 0 and (best is None or reduction > best.reduction):
                best = Proposal(g.id, g.root, n_keep, trial, value, reduction, False)
        if capped is not None:
            out.append(dataclasses.replace(capped, partial=True))
        elif best is not None:
            out.append(best)
    if any(p.meets_target for p in out):
        return [p for p in out if p.meets_target or p.partial]
    return out


def grid_steps(
    groups: Sequence[PrunableGroup],
    config: Mapping[int, int],
    specs_for: Callable[[Mapping[int, int]], Sequence[LayerSpec]],
    metric: Callable[[Sequence[LayerSpec]], float],
    step: int,
) -> list[Proposal]:
    """One step down the grid for every group not at its smallest count, whatever the metric
    says it saves (flagged partial, not meeting a target).

    For when `choose_proposals` finds nothing: a table flat where the network now is (keys
    within their noise of each other) estimates no saving from any step, while the device
    still measures the network above its budget. The engine then lets the device's checks,
    not the table, say when to stop. Empty when every group is at the floor of the grid.
    """
    current = metric(specs_for(config))
    out: list[Proposal] = []
    for g in groups:
        lower = [c for c in candidate_counts(g.channels, step) if c < config[g.id]]
        if not lower:
            continue
        trial = dict(config)
        trial[g.id] = lower[-1]
        value = metric(specs_for(trial))
        out.append(Proposal(g.id, g.root, lower[-1], trial, value, current - value, False,
                            partial=True))
    return out


def proposal_seed(seed: int, iteration: int, group_id: int) -> int:
    digest = hashlib.sha256(f"{seed}/{iteration}/{group_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def evaluate_proposal(model: nn.Module, proposal: Proposal, iteration: int,
                      ctx: ProposalContext, device: str = "cpu") -> ProposalResult:
    """Prunes a copy of `model`, re-estimates BatchNorm, fine-tunes, and scores it on holdout.

    Runs single-threaded with a seed derived from (run seed, iteration, group), so the result
    is the same in this process or a worker. On another `device` (a GPU given to a Ray task)
    the pruned copy trains there and comes back on the CPU; its numbers then follow that
    device's arithmetic, not the CPU's bit for bit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed = proposal_seed(ctx.seed, iteration, proposal.group_id)
        t0 = time.perf_counter()
        pruned = prune_group(model, proposal.root, proposal.n_keep, ctx.importance,  # type: ignore[arg-type]
                             input_shape=ctx.input_shape)
        pruned.to(device)
        recalibrate_batchnorm(pruned, ctx.train, num_batches=ctx.bn_batches, seed=seed)
        t1 = time.perf_counter()
        after_bn = evaluate(pruned, ctx.holdout)
        t2 = time.perf_counter()
        if ctx.short_term_steps > 0:
            config = dataclasses.replace(ctx.train_config, seed=seed, device=device)
            fine_tune(pruned, ctx.train, ctx.short_term_steps, config)
        t3 = time.perf_counter()
        scored = score(pruned, ctx.holdout)
        t4 = time.perf_counter()
    finally:
        torch.set_num_threads(threads)
    pruned.cpu()
    return ProposalResult(proposal, pruned, scored.accuracy, after_bn, surgery_s=t1 - t0,
                          finetune_s=t3 - t2, eval_s=(t2 - t1) + (t4 - t3),
                          holdout_loss=scored.loss)
