"""Channel surgery: prune a group's lowest-importance filters with torch-pruning.

Everything here works on a deep copy and returns it; the model passed in is never changed.
Pruning a group goes through torch-pruning's `Group.prune`, so the coupled convs, the
BatchNorm parameters and running statistics, the depthwise convs and the next layers' input
channels all shrink consistently.

Importance (NetAdapt keeps the filters of largest L2 norm): for each conv/linear whose output
channels are in the group, the p-norm of every output filter, divided by that layer's mean
filter norm so that each coupled layer weighs the same, summed over the layers. For a plain
conv that is just its filter norms. A callable taking a torch-pruning group (with full indices)
and returning one score per channel may be passed instead.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from host.graph.groups import (
    ChannelConfig,
    PrunableGroup,
    build_dependency_graph,
    current_config,
    find_groups,
    validate_config,
)

__all__ = [
    "Importance",
    "filter_importance",
    "prune_group",
    "apply_config",
    "make_divisible",
    "uniform_width_config",
]

logger = logging.getLogger(__name__)

Importance = str | Callable[[Any], torch.Tensor]
""""l2" or "l1" (filter norms), or a callable: torch-pruning group -> score per channel."""


def filter_importance(dg: tp.DependencyGraph, group: Any, p: int = 2) -> torch.Tensor:
    """Score per root channel of a torch-pruning group with full indices (higher = keep).

    Sums over the group's conv/linear layers whose output channels it prunes the p-norm of
    each output filter divided by the layer's mean filter norm.
    """
    scores: torch.Tensor | None = None
    n_root = len(group[0].idxs)
    for item in group:
        dep, idxs = item.dep, item.idxs
        module = dep.target.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if not dg.is_out_channel_pruning_fn(dep.handler):
            continue
        root_idxs = item.root_idxs if item.root_idxs is not None else idxs
        weight = module.weight.detach().flatten(1)  # (out, in/groups * kh * kw)
        norms = torch.linalg.vector_norm(weight, ord=p, dim=1)  # (out,)
        norms = norms[torch.as_tensor(idxs, dtype=torch.long)]  # (len(idxs),)
        norms = norms / norms.mean().clamp_min(1e-12)
        if scores is None:
            scores = torch.zeros(n_root, dtype=norms.dtype)
        scores.index_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), norms)
    if scores is None:
        raise ValueError("the group holds no conv or linear layer whose outputs it prunes")
    return scores


def _scores(dg: tp.DependencyGraph, group: Any, importance: Importance) -> torch.Tensor:
    if callable(importance):
        return torch.as_tensor(importance(group)).flatten()
    if importance == "l2":
        return filter_importance(dg, group, p=2)
    if importance == "l1":
        return filter_importance(dg, group, p=1)
    raise ValueError(f"unknown importance {importance!r}; use 'l2', 'l1' or a callable")


def _prune_root(
    dg: tp.DependencyGraph, model: nn.Module, root: str, n_keep: int, importance: Importance
) -> int:
    """Prune the group rooted at `root` in place to `n_keep` channels; returns how many went."""
    module = model.get_submodule(root)
    pruner = dg.get_pruner_of_module(module)
    n = int(pruner.get_out_channels(module))
    if not 1 <= n_keep <= n:
        raise ValueError(f"group {root!r} has {n} channels; cannot keep {n_keep} (1..{n})")
    if n_keep == n:
        return 0
    group = dg.get_pruning_group(module, pruner.prune_out_channels, list(range(n)))
    scores = _scores(dg, group, importance)
    if scores.numel() != n:
        raise ValueError(f"importance gave {scores.numel()} scores for {n} channels of {root!r}")
    # stable: ties keep the lower index
    order = torch.argsort(scores, descending=True, stable=True)
    drop = sorted(int(i) for i in order[n_keep:])
    group.prune(idxs=drop)
    logger.debug("pruned %s: %d -> %d channels", root, n, n_keep)
    return len(drop)


def _frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _refreeze(model: nn.Module, frozen: set[str]) -> None:
    """torch-pruning replaces pruned parameters with new ones that require grad: frozen layers
    stay frozen."""
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)


def _root_of(model: nn.Module, group: PrunableGroup | int | str, input_shape: Sequence[int]) -> str:
    if isinstance(group, PrunableGroup):
        return group.root
    if isinstance(group, str):
        return group
    groups = find_groups(model, input_shape)
    for g in groups:
        if g.id == group:
            return g.root
    raise ValueError(f"unknown group id {group}; the model has ids 0..{len(groups) - 1}")


def prune_group(
    model: nn.Module,
    group: PrunableGroup | int | str,
    n_keep: int,
    importance: Importance = "l2",
    *,
    input_shape: Sequence[int],
) -> nn.Module:
    """A copy of `model` with the group pruned to its `n_keep` most important channels.

    Args:
        model: the network; not changed.
        group: a `PrunableGroup`, its id (groups are then found again) or its root module name.
        n_keep: channels to keep, 1..current.
        importance: "l2", "l1" or a callable (see module docstring).
        input_shape: (N, C, H, W) example input for torch-pruning's tracing.

    Raises:
        ValueError: unknown group, or `n_keep` out of range.
    """
    root = _root_of(model, group, input_shape)
    pruned = copy.deepcopy(model)
    frozen = _frozen_names(model)
    dg = build_dependency_graph(pruned, input_shape)
    _prune_root(dg, pruned, root, n_keep, importance)
    _refreeze(pruned, frozen)
    return pruned


def apply_config(
    model: nn.Module,
    config: Mapping[int, int],
    groups: Sequence[PrunableGroup],
    *,
    input_shape: Sequence[int],
    importance: Importance = "l2",
) -> nn.Module:
    """A copy of `model` pruned to `config` (group id -> channels), groups in id order.

    `groups` are those found on `model` (or on the model it was pruned from: roots are
    looked up by name, so counts already below `groups[i].channels` are fine as long as the
    target is not above the current count).

    Raises:
        ValueError: the config names an unknown group or asks for more channels than a group
            has now.
    """
    now = current_config(model, groups)
    validate_config([dataclasses.replace(g, channels=now[g.id]) for g in groups], config)
    pruned = copy.deepcopy(model)
    frozen = _frozen_names(model)
    dg = build_dependency_graph(pruned, input_shape)
    by_id = {g.id: g for g in groups}
    removed = 0
    for gid in sorted(config):
        removed += _prune_root(dg, pruned, by_id[gid].root, int(config[gid]), importance)
    _refreeze(pruned, frozen)
    logger.info("applied config to %d groups, removed %d channels", len(config), removed)
    return pruned


def make_divisible(value: float, divisor: int, min_value: int | None = None) -> int:
    """Round to the nearest multiple of `divisor`, never below `min_value` (default divisor)
    and never more than 10% below `value` (the MobileNet rule)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return int(rounded)


def uniform_width_config(
    groups: Sequence[PrunableGroup], fraction: float, round_to: int = 8
) -> ChannelConfig:
    """The width-multiplier baseline: every group at `fraction` of its channels, rounded to a
    multiple of `round_to` (groups of at most `round_to` channels are rounded to 1), never
    above the current count.

    Raises:
        ValueError: `fraction` not in (0, 1] or `round_to` < 1.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if round_to < 1:
        raise ValueError(f"round_to must be >= 1, got {round_to}")
    config: ChannelConfig = {}
    for g in groups:
        if g.channels <= round_to:
            target = max(1, round(g.channels * fraction))
        else:
            target = make_divisible(g.channels * fraction, round_to)
        config[g.id] = min(g.channels, target)
    return config
