"""Which lookup-table keys a network needs: every fusion unit at every channel count the
NetAdapt engine may choose.

A unit's spec depends on at most two prunable groups (the group feeding its input and the group
of its output; a depthwise conv follows its producer, so one). For each unit, every combination
of those groups' candidate counts on the grid is enumerated through the same `ChannelPlanner`
the engine uses, so the table holds exactly the specs the engine will look up.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from device_server.spec import LayerSpec
from host.graph.groups import ChannelPlanner

__all__ = ["candidate_counts", "unit_dependencies", "KeyPlan", "plan_keys", "shuffled"]


def candidate_counts(channels: int, step: int) -> list[int]:
    """Channel counts a group may be pruned to: multiples of `step` below `channels`, and
    `channels` itself (the unpruned count, even when off the grid)."""
    if step < 1:
        raise ValueError(f"grid step must be >= 1, got {step}")
    return sorted({*range(step, channels, step), channels})


def unit_dependencies(planner: ChannelPlanner) -> list[tuple[int, ...]]:
    """For each unit, the ids of the groups whose count changes its (in, out) channels."""
    base = {g.id: g.channels for g in planner.groups}
    reference = planner.channels(base)
    deps: list[set[int]] = [set() for _ in reference]
    for g in planner.groups:
        probe = dict(base)
        probe[g.id] = g.channels - 1 if g.channels > 1 else 2
        for i, pair in enumerate(planner.channels(probe)):
            if pair != reference[i]:
                deps[i].add(g.id)
    return [tuple(sorted(d)) for d in deps]


@dataclass(frozen=True)
class KeyPlan:
    """The specs one network needs, with the per-layer entry count before de-duplication."""

    specs: tuple[LayerSpec, ...]   # distinct, in a stable order
    entries: int                   # (unit, channel combination) pairs enumerated

    def __len__(self) -> int:
        return len(self.specs)


def plan_keys(
    planner: ChannelPlanner,
    step: int = 8,
    counts: Mapping[int, Sequence[int]] | None = None,
) -> KeyPlan:
    """Every spec the engine may ask for while pruning this network on a grid of `step`.

    Args:
        planner: the network's channel planner (template units and groups).
        step: grid step (8 by default; some accelerators prefer 16 or 32).
        counts: per-group candidate counts overriding the grid (e.g. a coarser plan).
    """
    base = {g.id: g.channels for g in planner.groups}
    cands = {g.id: list(counts[g.id]) if counts and g.id in counts
             else candidate_counts(g.channels, step) for g in planner.groups}
    seen: dict[LayerSpec, None] = {}
    entries = 0
    for index, deps in enumerate(unit_dependencies(planner)):
        for combo in itertools.product(*(cands[g] for g in deps)):
            config = dict(base)
            config.update(zip(deps, combo, strict=True))
            seen.setdefault(planner.specs(config)[index], None)
            entries += 1
    return KeyPlan(specs=tuple(seen), entries=entries)


def shuffled(specs: Iterable[LayerSpec], seed: int = 0) -> list[LayerSpec]:
    """A seeded shuffle, so thermal drift during a build does not bias one layer's entries."""
    out = list(specs)
    random.Random(seed).shuffle(out)
    return out
