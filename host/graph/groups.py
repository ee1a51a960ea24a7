"""Prunable channel groups and channel configurations.

A `PrunableGroup` is a set of channels that must be pruned together: the output channels of a
conv, the BatchNorm after it, the depthwise conv that reads them, and every conv whose output
joins them in a residual add. torch-pruning's `DependencyGraph` finds the coupling; this module
names each group after its first conv (`root`) and numbers groups in module order, so ids are
the same for a model and any pruned copy of it.

Excluded: the channels of the network output (the classifier's outputs, and anything coupled to
them) and the network input channels (no layer produces them).

A `ChannelConfig` maps group id -> channel count. `units_for_config` (or a `ChannelPlanner` kept
by the caller) turns a config into the `LayerSpec`s of the network as if pruned to it, without
touching torch: it only rewrites channel counts of the template units, which is what the
NetAdapt engine needs thousands of times per iteration to query the lookup table.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from device_server.spec import Activation, LayerSpec, OpKind
from host.graph.units import (
    INPUT_SOURCE,
    FusionUnit,
    UnsupportedLayerError,
    build_specs,
    extract_units,
)

__all__ = [
    "ChannelConfig",
    "PrunableGroup",
    "ChannelPlanner",
    "build_dependency_graph",
    "find_groups",
    "current_config",
    "validate_config",
    "units_for_config",
]

logger = logging.getLogger(__name__)

ChannelConfig = dict[int, int]
"""Group id -> number of channels kept. Groups left out keep their current count."""

_PRUNABLE = (nn.Conv2d, nn.Linear)
_SpecCache = dict[tuple[int, int], tuple[LayerSpec, ...]]  # (in, out channels) -> unit specs


@dataclass(frozen=True)
class PrunableGroup:
    """Channels pruned together.

    `out_units` are the units whose output channel count is this group's count (the convs, and
    the depthwise convs, pools and adds that carry the same channels); `in_units` the units
    whose input channel count it sets.
    """

    id: int
    root: str  # first conv/linear (in module order) whose output channels are the group
    channels: int  # current channel count
    layers: tuple[str, ...]  # conv/linear modules whose output channels are the group
    members: tuple[str, ...]  # every module the group's pruning touches (BN, next convs, ...)
    out_units: tuple[int, ...]
    in_units: tuple[int, ...]

    def describe(self) -> str:
        return f"group {self.id} [{self.root}] {self.channels} ch, {len(self.layers)} layer(s)"


def build_dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, leaving its train/eval modes as they were
    (torch-pruning switches the model to eval to trace it)."""
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.enable_grad():  # the tracer follows autograd's graph
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=torch.zeros(tuple(input_shape)), verbose=False
            )
    finally:
        for m, training in modes.items():
            m.training = training


def _tp_groups(dg: tp.DependencyGraph) -> list[tuple[str, list[str], list[str], int]]:
    """(root, out layers, members, channels) of every torch-pruning group rooted at a conv or
    linear, with the root re-chosen as the first out layer in module order."""
    names = {m: n for n, m in dg.model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    found = []
    for group in dg.get_all_groups(root_module_types=_PRUNABLE):
        layers: list[str] = []
        members: list[str] = []
        for dep, _ in group:
            module = dep.target.module
            name = names.get(module)
            if name is None:
                continue  # torch-pruning's own placeholder ops (add, reshape, output)
            if name not in members:
                members.append(name)
            if isinstance(module, _PRUNABLE) and dg.is_out_channel_pruning_fn(dep.handler):
                if name not in layers:
                    layers.append(name)
        if not layers:
            continue
        layers.sort(key=order.__getitem__)
        root_module = dg.model.get_submodule(layers[0])
        channels = int(dg.get_out_channels(root_module))
        found.append((layers[0], layers, members, channels))
    found.sort(key=lambda f: order[f[0]])
    return found


def _grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (torch-pruning cannot keep its groups divisible)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and not (module.groups == module.in_channels == module.out_channels)
    )


def find_groups(
    model: nn.Module,
    input_shape: Sequence[int],
    units: Sequence[FusionUnit] | None = None,
) -> list[PrunableGroup]:
    """The prunable channel groups of `model`, ids 0.. in module order of their roots.

    Args:
        model: the network (its train/eval mode is kept).
        input_shape: (N, C, H, W) of the example input.
        units: `extract_units(model, input_shape)`, if already computed.

    Raises:
        UnsupportedLayerError: the model cannot be traced, or torch-pruning's coupling disagrees
            with the traced data flow (the message names the layer).
    """
    if units is None:
        units = extract_units(model, input_shape)
    dg = build_dependency_graph(model, input_shape)
    unit_of: dict[str, list[int]] = {}
    for u in units:
        if u.core.op in (OpKind.CONV2D, OpKind.LINEAR):
            unit_of.setdefault(u.modules[0], []).append(u.index)

    excluded = _output_layers(units)
    candidates = []
    for root, layers, members, channels in _tp_groups(dg):
        if excluded.intersection(layers):
            logger.debug("group at %s feeds the network output: not prunable", root)
            continue
        grouped = [n for n in members if _grouped(model.get_submodule(n))]
        if grouped:
            logger.warning("group at %s touches grouped conv %s: not prunable", root, grouped[0])
            continue
        missing = [n for n in layers if n not in unit_of]
        if missing:
            raise UnsupportedLayerError(
                f"layer {missing[0]!r} is prunable for torch-pruning but was not traced as a unit"
            )
        candidates.append((root, layers, members, channels))

    out_sym, in_sym = _propagate(units, {n: gid for gid, c in enumerate(candidates) for n in c[1]})
    groups = []
    for gid, (root, layers, members, channels) in enumerate(candidates):
        groups.append(
            PrunableGroup(
                id=gid,
                root=root,
                channels=channels,
                layers=tuple(layers),
                members=tuple(members),
                out_units=tuple(i for i, s in enumerate(out_sym) if s == gid),
                in_units=tuple(i for i, s in enumerate(in_sym) if s == gid),
            )
        )
    _check_coupling(model, units, groups, in_sym)
    logger.info("found %d prunable groups over %d units", len(groups), len(units))
    return groups


def _output_layers(units: Sequence[FusionUnit]) -> set[str]:
    """Conv/linear modules whose output channels reach a network output."""
    found: set[str] = set()
    for u in units:
        if not u.is_output:
            continue
        i = u.index
        while i != INPUT_SOURCE:
            unit = units[i]
            if unit.core.op in (OpKind.CONV2D, OpKind.LINEAR) and not unit.is_depthwise:
                found.add(unit.modules[0])
                break
            i = unit.source
    return found


def _carries_channels(u: FusionUnit) -> bool:
    """Output channels are the input channels (pool, add, depthwise conv)."""
    return u.core.op not in (OpKind.CONV2D, OpKind.LINEAR) or u.is_depthwise


def _propagate(
    units: Sequence[FusionUnit], group_of_layer: Mapping[str, int]
) -> tuple[list[int | None], list[int | None]]:
    """Per unit, the group that sets its output and input channel counts (None: fixed)."""
    out_sym: list[int | None] = []
    in_sym: list[int | None] = []
    for u in units:
        src = None if u.source == INPUT_SOURCE else out_sym[u.source]
        in_sym.append(src)
        if _carries_channels(u):
            out_sym.append(src)
        else:
            out_sym.append(group_of_layer.get(u.modules[0]))
    return out_sym, in_sym


def _check_coupling(
    model: nn.Module,
    units: Sequence[FusionUnit],
    groups: Sequence[PrunableGroup],
    in_sym: Sequence[int | None],
) -> None:
    """Every conv/linear whose input torch-pruning cuts with a group must read that group's
    channels in the traced data flow, else configs would describe a different network."""
    by_name = {u.modules[0]: u for u in units if u.modules}
    for g in groups:
        for name in g.members:
            u = by_name.get(name)
            if u is None or name in g.layers or u.core.op not in (OpKind.CONV2D, OpKind.LINEAR):
                continue
            if u.is_depthwise:
                continue
            if in_sym[u.index] != g.id:
                raise UnsupportedLayerError(
                    f"layer {name!r}: torch-pruning couples its input with group {g.id} "
                    f"({g.root}) but the traced graph feeds it from elsewhere; concatenation "
                    f"or channel reshuffles are not supported"
                )


def current_config(model: nn.Module, groups: Sequence[PrunableGroup]) -> ChannelConfig:
    """The channel count of every group in `model` (the original or a pruned copy).

    Raises:
        KeyError: `model` has no module named like a group's root.
    """
    config: ChannelConfig = {}
    for g in groups:
        m = model.get_submodule(g.root)
        if isinstance(m, nn.Conv2d):
            config[g.id] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            config[g.id] = int(m.out_features)
        else:
            raise KeyError(f"module {g.root!r} is a {type(m).__name__}, not a conv or linear")
    return config


def validate_config(groups: Sequence[PrunableGroup], config: Mapping[int, int]) -> None:
    """Raises ValueError when a config names an unknown group or asks for a count outside
    1..current channels."""
    by_id = {g.id: g for g in groups}
    for gid, n in config.items():
        g = by_id.get(gid)
        if g is None:
            raise ValueError(f"unknown group id {gid}; known ids are 0..{len(groups) - 1}")
        if not 1 <= n <= g.channels:
            raise ValueError(
                f"group {gid} ({g.root}) has {g.channels} channels; asked for {n} "
                f"(must be 1..{g.channels})"
            )


class ChannelPlanner:
    """Turns channel configs into the `LayerSpec`s of the network pruned to them, fast.

    Built once per (template units, groups); `specs(config)` then costs one pass over the
    units with cached spec construction.
    """

    def __init__(self, units: Sequence[FusionUnit], groups: Sequence[PrunableGroup]) -> None:
        self.units = tuple(units)
        self.groups = tuple(groups)
        self._defaults = {g.id: g.channels for g in groups}
        group_of_unit: dict[int, int] = {}
        for g in groups:
            for i in g.out_units:
                if not _carries_channels(self.units[i]):
                    group_of_unit[i] = g.id
        # per unit: (source, in_scale, group id or None, carries channels, fixed out, in from
        # the network input, spec cache)
        self._plan: list[tuple[int, int, int | None, bool, int, int, _SpecCache]] = []
        for u in self.units:
            self._plan.append(
                (
                    u.source,
                    u.in_scale,
                    group_of_unit.get(u.index),
                    _carries_channels(u),
                    u.core.out_channels,
                    u.core.input_shape[1] // u.in_scale,
                    {(u.in_channels // u.in_scale, u.core.out_channels or u.in_channels): u.specs},
                )
            )

    def channels(self, config: Mapping[int, int]) -> list[tuple[int, int]]:
        """(in channels, out channels) per unit; in channels before the linear in_scale."""
        defaults = self._defaults
        out: list[int] = []
        result = []
        for src, _scale, gid, carries, fixed, in_fixed, _cache in self._plan:
            in_c = in_fixed if src == INPUT_SOURCE else out[src]
            if carries:
                out_c = in_c
            elif gid is None:
                out_c = fixed
            else:
                out_c = config.get(gid, defaults[gid])
            out.append(out_c)
            result.append((in_c, out_c))
        return result

    def specs(self, config: Mapping[int, int]) -> list[LayerSpec]:
        """The specs of the network pruned to `config` (groups not named keep their count).

        Does not validate `config`; see `validate_config`.
        """
        units = self.units
        specs: list[LayerSpec] = []
        for i, key in enumerate(self.channels(config)):
            cache = self._plan[i][6]
            hit = cache.get(key)
            if hit is None:
                hit = cache[key] = _materialize(units[i], *key)
            specs.extend(hit)
        return specs


def _materialize(u: FusionUnit, in_c: int, out_c: int) -> tuple[LayerSpec, ...]:
    """The specs of unit `u` with `in_c` input and `out_c` output channels (in_c before the
    linear in_scale). Built directly rather than with dataclasses.replace + validate: only
    channel counts change, and this is the planner's hot path on a cache miss."""
    if in_c < 1 or out_c < 1:
        raise ValueError(f"unit {u.index} ({u.name}) would have {in_c} -> {out_c} channels")
    c = u.core
    shape = c.input_shape
    if c.op is OpKind.LINEAR:
        new_shape: tuple[int, ...] = (shape[0], in_c * u.in_scale)
    else:
        new_shape = (shape[0], in_c, *shape[2:])
    is_conv = c.op is OpKind.CONV2D
    core = LayerSpec(
        c.op,
        new_shape,
        out_c if is_conv or c.op is OpKind.LINEAR else c.out_channels,
        c.kernel,
        c.stride,
        c.padding,
        c.dilation,
        in_c if is_conv and u.is_depthwise else c.groups,
        c.bias,
        c.batch_norm,
        Activation.NONE,
        False,
    )
    return build_specs(core, u.activation, u.residual_add)


_PLANNERS: list[tuple[Sequence[FusionUnit], Sequence[PrunableGroup], int, ChannelPlanner]] = []
_MAX_PLANNERS = 8


def units_for_config(
    template_units: Sequence[FusionUnit],
    groups: Sequence[PrunableGroup],
    config: Mapping[int, int],
) -> list[LayerSpec]:
    """The specs of the network as if pruned to `config`, without surgery.

    Equal to `unit_specs(extract_units(apply_config(model, config, ...), input_shape))`.
    A `ChannelPlanner` is built on first use and reused while the same (unmodified) `units`
    and `groups` objects are passed.
    """
    for units, grps, n, planner in _PLANNERS:
        if units is template_units and grps is groups and n == len(template_units):
            return planner.specs(config)
    planner = ChannelPlanner(template_units, groups)
    _PLANNERS.insert(0, (template_units, groups, len(template_units), planner))
    del _PLANNERS[_MAX_PLANNERS:]
    return planner.specs(config)
