"""Which lookup-table keys a network needs: every fusion unit at every channel count the
NetAdapt engine may choose.

A unit's channel counts depend on a few prunable groups (the group feeding each input, the
group of its output; a depthwise conv follows its producer; a concatenation sums its inputs).
For each unit, every combination of those groups' candidate counts on the grid is enumerated,
and the unit built at it by the same `ChannelPlanner` the engine uses, so the table holds
exactly the specs the engine will look up.

Planning is streamed: a unit's channel counts are an affine function of its groups' counts
(found once by probing the planner), so each combination costs a few integer operations and one
spec; nothing is cached per combination and no list of configurations is built. Only the
distinct specs found so far are held (to drop repeats), and `max_keys` bounds them: a plan
beyond it is refused (`PlanTooLarge`) with its size and the finest grid that fits. The number
of (unit, combination) entries, an upper bound on the keys, is known up front from arithmetic.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from device_server.spec import LayerSpec

__all__ = ["ChannelPlanner", "Group", "candidate_counts", "unit_dependencies", "KeyPlan",
           "plan_keys", "iter_keys", "count_entries", "PlanTooLarge", "DEFAULT_MAX_KEYS",
           "shuffled"]

# ~30 min of a 2-core x86 daemon at LUT_POLICY (~58 keys/s), hours on a phone: beyond this a
# grid is almost always finer than the engine needs (its steps are a few percent of latency).
DEFAULT_MAX_KEYS = 100_000
_COARSER_STEPS = (2, 4, 8, 16, 32, 64)

_Key = tuple[tuple[int, ...], tuple[int, ...]]


class Group(Protocol):
    """A prunable group as planning sees it: its id and its unpruned channel count."""

    @property
    def id(self) -> int: ...

    @property
    def channels(self) -> int: ...


class ChannelPlanner(Protocol):
    """What key planning needs of a network (the contract `host.graph.groups.ChannelPlanner`
    fulfils; declared here so that lut depends on nothing above it).

    `channels(config)`: per fusion unit, (input channel counts, output channel counts) of the
    network pruned to `config` (group id -> channels); `unit_specs(i, key)`: the `LayerSpec`s of
    unit i at those counts.
    """

    @property
    def groups(self) -> Sequence[Group]: ...

    def channels(self, config: Mapping[int, int]) -> list[_Key]: ...

    def unit_specs(self, index: int, key: _Key) -> tuple[LayerSpec, ...]: ...


def candidate_counts(channels: int, step: int) -> list[int]:
    """Channel counts a group may be pruned to: multiples of `step` below `channels`, and
    `channels` itself (the unpruned count, even when off the grid)."""
    if step < 1:
        raise ValueError(f"grid step must be >= 1, got {step}")
    return sorted({*range(step, channels, step), channels})


class PlanTooLarge(ValueError):
    """More distinct keys than the caller allows. Says how many at least (and at most), and
    the finest coarser grid that fits, if one does."""

    def __init__(self, step: int, max_keys: int, at_least: int, entries: int,
                 fits: tuple[int, int] | None) -> None:
        self.step, self.max_keys, self.at_least, self.entries, self.fits = (
            step, max_keys, at_least, entries, fits)
        hint = (f"use --step {fits[0]} ({fits[1]:,} keys), or raise --max-keys"
                if fits else "use a coarser --step, or raise --max-keys")
        super().__init__(
            f"the table at --step {step} needs at least {at_least:,} distinct keys (up to "
            f"{entries:,} before de-duplication), over the limit of {max_keys:,} "
            f"(--max-keys): {hint}")


@dataclass(frozen=True)
class _UnitKeys:
    """How one unit's channel key follows its groups: key = base + Σ coeff_g · (v_g − base_g),
    over the flattened (inputs..., outputs...) counts. `affine` False: ask the planner."""

    index: int
    deps: tuple[int, ...]                  # group ids, ascending
    base: tuple[int, ...]
    n_in: int
    coeffs: tuple[tuple[int, ...], ...]    # per dep, per flattened count
    affine: bool


def _flat(key: _Key) -> tuple[int, ...]:
    return (*key[0], *key[1])


def _units(planner: ChannelPlanner) -> list[_UnitKeys]:
    base = {g.id: g.channels for g in planner.groups}
    reference = [_flat(k) for k in planner.channels(base)]
    deltas: dict[int, tuple[list[tuple[int, ...]], list[tuple[int, ...]], int]] = {}
    for g in planner.groups:
        sign = -1 if g.channels > 2 else 1  # stay >= 1 channel
        probes = []
        for k in (1, 2):
            probe = dict(base)
            probe[g.id] = g.channels + sign * k
            probes.append([_flat(key) for key in planner.channels(probe)])
        deltas[g.id] = (probes[0], probes[1], sign)
    out = []
    for i, (ref, key) in enumerate(zip(reference, planner.channels(base), strict=True)):
        deps, coeffs, affine = [], [], True
        for gid in sorted(deltas):
            one, two, sign = deltas[gid]
            d1 = tuple(a - b for a, b in zip(one[i], ref, strict=True))
            if not any(d1):
                continue
            d2 = tuple(a - b for a, b in zip(two[i], ref, strict=True))
            deps.append(gid)
            coeffs.append(tuple(d * sign for d in d1))
            affine = affine and d2 == tuple(2 * d for d in d1)
        out.append(_UnitKeys(i, tuple(deps), ref, len(key[0]), tuple(coeffs), affine))
    return out


def unit_dependencies(planner: ChannelPlanner) -> list[tuple[int, ...]]:
    """For each unit, the ids of the groups whose count changes its channel counts."""
    return [u.deps for u in _units(planner)]


def _candidates(planner: ChannelPlanner, step: int,
                counts: Mapping[int, Sequence[int]] | None) -> dict[int, list[int]]:
    return {g.id: list(counts[g.id]) if counts and g.id in counts
            else candidate_counts(g.channels, step) for g in planner.groups}


def count_entries(planner: ChannelPlanner, step: int = 8,
                  counts: Mapping[int, Sequence[int]] | None = None) -> int:
    """(unit, channel combination) pairs: an upper bound on the distinct keys, by arithmetic."""
    cands = _candidates(planner, step, counts)
    return sum(math.prod(len(cands[g]) for g in u.deps) for u in _units(planner))


def iter_keys(planner: ChannelPlanner, step: int = 8,
              counts: Mapping[int, Sequence[int]] | None = None) -> Iterator[LayerSpec]:
    """Every distinct spec the engine may ask for, streamed in a stable order (unit by unit,
    combinations in grid order); holds only the specs yielded so far."""
    cands = _candidates(planner, step, counts)
    base_config = {g.id: g.channels for g in planner.groups}
    seen: set[LayerSpec] = set()
    for u in _units(planner):
        base_values = [base_config[g] for g in u.deps]
        for combo in itertools.product(*(cands[g] for g in u.deps)):
            if u.affine:
                flat = list(u.base)
                for coeff, value, base in zip(u.coeffs, combo, base_values, strict=True):
                    if value != base:
                        flat = [f + c * (value - base) for f, c in zip(flat, coeff, strict=True)]
                key: _Key = (tuple(flat[:u.n_in]), tuple(flat[u.n_in:]))
            else:
                config = dict(base_config)
                config.update(zip(u.deps, combo, strict=True))
                key = planner.channels(config)[u.index]
            for spec in planner.unit_specs(u.index, key):
                if spec not in seen:
                    seen.add(spec)
                    yield spec


@dataclass(frozen=True)
class KeyPlan:
    """The specs one network needs, with the per-layer entry count before de-duplication."""

    specs: tuple[LayerSpec, ...]   # distinct, in a stable order
    entries: int                   # (unit, channel combination) pairs enumerated

    def __len__(self) -> int:
        return len(self.specs)


def _bounded(planner: ChannelPlanner, step: int,
             counts: Mapping[int, Sequence[int]] | None, max_keys: int | None
             ) -> list[LayerSpec] | None:
    specs = []
    for spec in iter_keys(planner, step, counts):
        specs.append(spec)
        if max_keys is not None and len(specs) > max_keys:
            return None
    return specs


def plan_keys(
    planner: ChannelPlanner,
    step: int = 8,
    counts: Mapping[int, Sequence[int]] | None = None,
    max_keys: int | None = None,
) -> KeyPlan:
    """Every spec the engine may ask for while pruning this network on a grid of `step`.

    Args:
        planner: the network's channel planner (template units and groups).
        step: grid step (8 by default; some accelerators prefer 16 or 32).
        counts: per-group candidate counts overriding the grid (e.g. a coarser plan).
        max_keys: refuse a plan of more distinct keys (None: no limit).

    Raises:
        PlanTooLarge: more than `max_keys` distinct keys; names the finest grid that fits.
    """
    entries = count_entries(planner, step, counts)
    if max_keys is not None:
        floor = _largest_unit(planner, step, counts)
        if floor > max_keys:  # one unit alone is over: refuse without enumerating anything
            raise PlanTooLarge(step, max_keys, floor, entries,
                               _finest_fit(planner, step, max_keys))
    specs = _bounded(planner, step, counts, max_keys)
    if specs is None:
        assert max_keys is not None
        raise PlanTooLarge(step, max_keys, max_keys + 1, entries,
                           _finest_fit(planner, step, max_keys))
    return KeyPlan(specs=tuple(specs), entries=entries)


def _largest_unit(planner: ChannelPlanner, step: int,
                  counts: Mapping[int, Sequence[int]] | None) -> int:
    """Distinct keys of the unit with the most (a lower bound on the plan), by arithmetic:
    a unit whose channel counts follow independent groups has one key per combination."""
    cands = _candidates(planner, step, counts)
    best = 0
    for u in _units(planner):
        if u.affine and np.linalg.matrix_rank(np.array(u.coeffs, dtype=float)) == len(u.deps):
            best = max(best, math.prod(len(cands[g]) for g in u.deps))
    return best


def _finest_fit(planner: ChannelPlanner, step: int, max_keys: int) -> tuple[int, int] | None:
    """(step, keys) of the finest grid coarser than `step` whose plan fits, if any."""
    for coarser in (s for s in _COARSER_STEPS if s > step):
        if _largest_unit(planner, coarser, None) > max_keys:
            continue
        specs = _bounded(planner, coarser, None, max_keys)
        if specs is not None:
            return coarser, len(specs)
    return None


def shuffled(specs: Iterable[LayerSpec], seed: int = 0) -> list[LayerSpec]:
    """A seeded shuffle, so thermal drift during a build does not bias one layer's entries."""
    out = list(specs)
    random.Random(seed).shuffle(out)
    return out
