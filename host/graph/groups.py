"""Prunable channel groups: which channels NetAdapt may prune together, and which it keeps.

A `PrunableGroup` is a set of channels that must be pruned together: the output channels of a
conv, the BatchNorm after it, the depthwise conv that reads them, every conv whose output joins
them in a residual add or an elementwise multiply (a squeeze-and-excitation gate), and the slice
of every concatenation they enter. torch-pruning's `DependencyGraph` finds the coupling (traced
in training mode too, so a head that runs only while training is pruned with the layers that
feed it); this module names each group after its first conv (`root`) and numbers groups in
module order, so ids are the same for a model and any pruned copy of it.

Some of torch-pruning's groups are kept whole, each with a reason (`GroupReport.kept`):

* the channels of the network output (the classifier's outputs, and anything coupled to them);
* groups whose only layers run in training mode (they cost nothing on the device);
* groups touching a grouped (not depthwise) conv, whose groups must stay divisible;
* groups whose channels meet channels that cannot move: added to or multiplied with the network
  input or a parameter/buffer, reshaped by constant sizes or across the channel axis (a channel
  shuffle), split (a split's parts would depend on which filters go), or concatenated with more
  than `MAX_CONCAT_GROUPS` other groups.

`ChannelPlanner` turns a channel configuration (group id -> count) into the `LayerSpec`s of the
network as if pruned to it, without touching torch: it only rewrites channel counts of the
template units, which is what the NetAdapt engine needs thousands of times per iteration.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp

from device_server.spec import LayerSpec, NodeOperand, OpKind
from host.graph.units import (
    CONSTANT_SOURCE,
    INPUT_SOURCE,
    FusionUnit,
    build_specs,
    extract_units,
)

__all__ = [
    "ChannelConfig",
    "PrunableGroup",
    "KeptGroup",
    "GroupReport",
    "ChannelPlanner",
    "MAX_CONCAT_GROUPS",
    "build_dependency_graph",
    "analyse_groups",
    "find_groups",
    "current_config",
    "validate_config",
    "units_for_config",
]

logger = logging.getLogger(__name__)

ChannelConfig = dict[int, int]
"""Group id -> number of channels kept. Groups left out keep their current count."""

MAX_CONCAT_GROUPS = 4
"""A concatenation of more prunable groups than this keeps them all (DenseNet's dense blocks):
every unit after it would depend on each of them, and a table of every combination of their
counts would not fit anywhere."""

_PRUNABLE = (nn.Conv2d, nn.Linear)
_Sym = frozenset[int]  # the group ids a channel count depends on
_EMPTY: _Sym = frozenset()


@dataclass(frozen=True)
class PrunableGroup:
    """Channels pruned together.

    `out_units` are the units whose output channel count depends on this group (the convs, and
    the depthwise convs, pools, adds and concatenations that carry the channels); `in_units` the
    units whose input channel count it sets.
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


@dataclass(frozen=True)
class KeptGroup:
    """A group torch-pruning found that NetAdapt leaves unpruned, and why."""

    root: str
    layers: tuple[str, ...]
    channels: int
    reason: str
    expected: bool = False  # the network output or a training-only head: no warning

    def describe(self) -> str:
        return f"layer {self.root!r} ({self.channels} channels) kept: {self.reason}"


@dataclass
class GroupReport:
    """The groups NetAdapt may prune and those it keeps."""

    groups: list[PrunableGroup]
    kept: list[KeptGroup] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """One line per group kept for a reason the user may want to change."""
        return [k.describe() for k in self.kept if not k.expected]


# -- torch-pruning --------------------------------------------------------------------------------

def _tolerate_reshapes() -> None:
    """torch-pruning 1.6 maps channel indices through any reshape of a 4-D tensor as if it were
    a flatten; through a channel shuffle's view to five dimensions that mapping is wrong (it
    divides by zero, or multiplies the indices until grouping takes half a minute). Here a
    reshape keeps torch-pruning's mapping only when it is a flatten of (N, C, H, W) (stride
    H*W), else the identity; the groups whose channels pass through such a reshape are kept
    whole by `analyse_groups`, so the identity never prunes anything. Installed once, on
    import."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "_netadapt_guard", False):
        return

    def guarded(graph: Any, node: Any) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            pass
        size = getattr(node.grad_fn, "_saved_self_sizes",
                       getattr(node.grad_fn, "_saved_self_sym_sizes", None))
        stride = int(size[2]) * int(size[3]) if size is not None and len(size) == 4 else -1
        for other in (node, *node.inputs, *node.outputs):
            for dep in other.dependencies:
                if node not in (dep.source, dep.target):
                    continue
                mapping = dep.index_mapping[0]
                if (isinstance(mapping, index_mapping._FlattenIndexMapping)
                        and mapping._stride != stride):
                    dep.index_mapping[0] = None
                    logger.debug("torch-pruning: no index mapping through reshape %s", node)

    guarded._netadapt_guard = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = guarded


_tolerate_reshapes()


def build_dependency_graph(model: nn.Module, input_shape: Sequence[int]) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, traced in training mode (so heads that run
    only while training are coupled with the layers that feed them) on a batch of at least 2
    (BatchNorm needs it), with an input that requires grad (so frozen layers are traced too).

    The model's train/eval modes, buffers (BatchNorm statistics) and `requires_grad` flags, and
    the caller's random number generator (dropout draws from it), are left as they were. A
    model whose training-mode forward fails on the example is traced in eval mode.
    """
    shape = tuple(int(d) for d in input_shape)
    example = torch.zeros((max(2, shape[0]), *shape[1:]), requires_grad=True)  # (N>=2, C, H, W)
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def forward_train(m: nn.Module, x: torch.Tensor) -> object:
        m.train()
        return m(x)

    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):  # tracer follows autograd
            try:
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example, forward_fn=forward_train, verbose=False)
            except Exception as exc:  # noqa: BLE001 - a model that cannot run in training mode
                logger.info("training-mode trace failed (%s); tracing in eval mode", exc)
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example[:shape[0]], verbose=False)
    finally:
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])


def _all_groups(dg: tp.DependencyGraph) -> tuple[list[Any], dict[str, str]]:
    """`DependencyGraph.get_all_groups`, one root at a time: a root whose grouping fails inside
    torch-pruning (its index mappings through a channel shuffle's split) is reported by name
    with the error instead of ending the analysis."""
    names = {m: n for n, m in dg.model.named_modules()}
    visited: set[nn.Module] = set()
    groups: list[Any] = []
    failed: dict[str, str] = {}
    for m in list(dg.module2node):
        if not isinstance(m, _PRUNABLE) or m in visited or m in dg.IGNORED_LAYERS_IN_TRACING:
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels,
                                         list(range(pruner.get_out_channels(m))))
        except Exception as exc:  # noqa: BLE001 - torch-pruning's own failure on this root
            failed[names.get(m, "?")] = f"{type(exc).__name__}: {exc}"
            visited.add(m)
            continue
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
        groups.append(group)
    return groups, failed


def _tp_groups(dg: tp.DependencyGraph) -> tuple[list[tuple[str, list[str], list[str], int]],
                                                 dict[str, str]]:
    """(root, out layers, members, channels) of every torch-pruning group rooted at a conv or
    linear, with the root re-chosen as the first out layer in module order; and the roots
    torch-pruning failed on, with its error."""
    names = {m: n for n, m in dg.model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    found = []
    all_groups, failed = _all_groups(dg)
    for group in all_groups:
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
    return found, failed


def _grouped(module: nn.Module) -> bool:
    """A grouped conv that is not depthwise (torch-pruning cannot keep its groups divisible)."""
    return (
        isinstance(module, nn.Conv2d)
        and module.groups > 1
        and not (module.groups == module.in_channels == module.out_channels)
    )


# -- channel symbols: which groups each unit's counts depend on -----------------------------------

@dataclass
class _Flow:
    """Per unit: the groups its output (per port) and each input depend on."""

    out: list[list[_Sym]]
    inputs: list[list[_Sym]]


def _flow(units: Sequence[FusionUnit], group_of_layer: Mapping[str, int]) -> _Flow:
    out: list[list[_Sym]] = []
    inputs: list[list[_Sym]] = []
    for u in units:
        ins = [out[s][p] if s >= 0 else _EMPTY for s, p in zip(u.inputs, u.ports, strict=True)]
        inputs.append(ins)
        ports = max(1, len(u.out_channels_by_port))
        if u.rule == "own":
            gid = group_of_layer.get(u.modules[0]) if u.modules else None
            out.append([frozenset({gid}) if gid is not None else _EMPTY])
        elif u.rule == "carry":
            out.append([ins[u.carry_from] if ins else _EMPTY])
        elif u.rule == "concat":
            out.append([frozenset().union(*ins)])
        else:
            out.append([_EMPTY] * ports)
    return _Flow(out, inputs)


def _partner(units: Sequence[FusionUnit], src: int) -> str:
    if src == INPUT_SOURCE:
        return "the network input"
    if src == CONSTANT_SOURCE:
        return "a parameter or buffer"
    return f"the kept channels of {units[src].name!r}"


def _pins(units: Sequence[FusionUnit], flow: _Flow, candidates: Sequence[_Candidate],
          unit_of: Mapping[str, FusionUnit]) -> dict[int, str]:
    """Candidate index -> why its channels cannot be pruned (empty when all can)."""
    pins: dict[int, str] = {}

    def pin(syms: _Sym, reason: str) -> None:
        for g in syms:
            pins.setdefault(g, reason)

    for u, ins, outs in zip(units, flow.inputs, flow.out, strict=True):
        if u.rule == "fixed":
            pin(frozenset().union(*ins) if ins else _EMPTY,
                u.note or f"its channels reach {_fixed_what(u)} at {u.name!r}, whose shape "
                          f"cannot follow a pruned count")
            continue
        if u.rule == "concat":
            joined = frozenset().union(*ins)
            if len(joined) > MAX_CONCAT_GROUPS:
                pin(joined, f"one of {len(joined)} groups concatenated at {u.name!r} (more than "
                            f"{MAX_CONCAT_GROUPS} are kept whole)")
            continue
        coupled = [j for j, c in enumerate(u.coupled) if c]
        if u.residual_add and len(u.inputs) > 1:
            sides = [(outs[0], None), (ins[1], u.inputs[1])]
        elif u.rule == "carry" and len(coupled) > 1:
            sides = [(ins[j], u.inputs[j]) for j in coupled]
        else:
            continue
        if len({s for s, _ in sides}) > 1:
            fixed = [src for s, src in sides if not s and src is not None]
            op = "added to" if u.residual_add or u.core.op is OpKind.ADD else "combined with"
            if u.core.op is OpKind.NODE:
                op = {"Mul": "multiplied with", "Add": "added to", "Sub": "subtracted with",
                      "Div": "divided with"}.get(u.core.node_op, op)
            what = _partner(units, fixed[0]) if fixed else "channels of another group"
            pin(frozenset().union(*(s for s, _ in sides)),
                f"{op} {what} at {u.nodes[-1]!r}, whose channels cannot move with it")
    for ci, cand in enumerate(candidates):
        for name in cand.members:
            member = unit_of.get(name)
            if member is None or name in cand.layers or member.is_depthwise:
                continue
            if ci not in frozenset().union(*flow.inputs[member.index]):
                pins.setdefault(ci, f"torch-pruning cuts the input of {name!r} with it, but the "
                                    f"traced graph feeds {name!r} from elsewhere")
    return pins


def _fixed_what(u: FusionUnit) -> str:
    op = u.core.node_op if u.core.op is OpKind.NODE else u.core.op.value
    if op == "Split":
        return "a split (its parts would depend on which filters go)"
    if op == "Transpose":
        return "a transpose"
    return f"a {op}"


@dataclass(frozen=True)
class _Candidate:
    root: str
    layers: tuple[str, ...]
    members: tuple[str, ...]
    channels: int


def _output_layers(units: Sequence[FusionUnit]) -> set[str]:
    """Conv/linear modules whose output channels reach a network output."""
    found: set[str] = set()
    for u in units:
        if not u.is_output:
            continue
        stack = [u.index]
        seen: set[int] = set()
        while stack:
            i = stack.pop()
            if i < 0 or i in seen:
                continue
            seen.add(i)
            unit = units[i]
            if unit.rule == "own":
                found.add(unit.modules[0])
            elif unit.rule == "carry":
                stack.append(unit.inputs[unit.carry_from] if unit.inputs else INPUT_SOURCE)
            elif unit.rule == "concat":
                stack.extend(unit.inputs)
    return found


def analyse_groups(
    model: nn.Module,
    input_shape: Sequence[int],
    units: Sequence[FusionUnit] | None = None,
) -> GroupReport:
    """The prunable channel groups of `model` (ids 0.. in module order of their roots), and
    the groups torch-pruning found that are kept, each with its reason.

    Args:
        model: the network (its train/eval mode, buffers and flags are kept).
        input_shape: (N, C, H, W) of the example input.
        units: `extract_units(model, input_shape)`, if already computed.

    Raises:
        UnsupportedLayerError: the model cannot be traced (the message names the layer).
    """
    if units is None:
        units = extract_units(model, input_shape)
    dg = build_dependency_graph(model, input_shape)
    unit_of: dict[str, FusionUnit] = {}
    for u in units:
        if u.core.op in (OpKind.CONV2D, OpKind.LINEAR):
            unit_of.setdefault(u.modules[0], u)

    kept: list[KeptGroup] = []
    excluded = _output_layers(units)
    candidates: list[_Candidate] = []
    found, failed = _tp_groups(dg)
    for root, error in failed.items():
        module = model.get_submodule(root)
        channels = int(getattr(module, "out_channels", getattr(module, "out_features", 0)))
        kept.append(KeptGroup(root, (root,), channels, f"torch-pruning cannot group its "
                              f"channels ({error.splitlines()[0][:120]})"))
    for root, layers, members, channels in found:
        if excluded.intersection(layers):
            kept.append(KeptGroup(root, tuple(layers), channels, "its channels are the "
                                  "network's output", expected=True))
            continue
        if not any(n in unit_of for n in layers):
            kept.append(KeptGroup(root, tuple(layers), channels, "it runs only in training "
                                  "mode (not on the device)", expected=True))
            continue
        grouped = [n for n in members if _grouped(model.get_submodule(n))]
        if grouped:
            kept.append(KeptGroup(root, tuple(layers), channels, f"it touches the grouped conv "
                                  f"{grouped[0]!r}, whose groups must stay divisible"))
            continue
        candidates.append(_Candidate(root, tuple(layers), tuple(members), channels))

    while True:
        flow = _flow(units, {n: i for i, c in enumerate(candidates) for n in c.layers})
        pins = _pins(units, flow, candidates, unit_of)
        if not pins:
            break
        for i in sorted(pins):
            c = candidates[i]
            kept.append(KeptGroup(c.root, c.layers, c.channels, pins[i]))
        candidates = [c for i, c in enumerate(candidates) if i not in pins]

    groups = []
    for gid, c in enumerate(candidates):
        groups.append(
            PrunableGroup(
                id=gid,
                root=c.root,
                channels=c.channels,
                layers=c.layers,
                members=c.members,
                out_units=tuple(i for i, o in enumerate(flow.out) if gid in frozenset().union(*o)),
                in_units=tuple(i for i, s in enumerate(flow.inputs)
                               if gid in frozenset().union(*s)),
            )
        )
    logger.info("found %d prunable groups over %d units (%d kept whole)", len(groups),
                len(units), len(kept))
    return GroupReport(groups, kept)


def find_groups(
    model: nn.Module,
    input_shape: Sequence[int],
    units: Sequence[FusionUnit] | None = None,
) -> list[PrunableGroup]:
    """The prunable channel groups of `model`, ids 0.. in module order (see `analyse_groups`,
    which also says which groups are kept and why).

    Raises:
        UnsupportedLayerError: the model cannot be traced (the message names the layer).
    """
    return analyse_groups(model, input_shape, units).groups


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


# -- the planner ----------------------------------------------------------------------------------

_Key = tuple[tuple[int, ...], tuple[int, ...]]  # (channels of each input, of each output)


@dataclass
class _Plan:
    """How one unit's channel counts follow the configuration."""

    unit: FusionUnit
    inputs: tuple[tuple[int, int], ...]  # (producer, port)
    fixed_in: tuple[int, ...]  # channels of inputs from the network input or constants
    gid: int | None  # "own" units of a prunable group
    cache: dict[_Key, tuple[LayerSpec, ...]]


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
                if self.units[i].rule == "own":
                    group_of_unit[i] = g.id
        self._plans: list[_Plan] = []
        for u in self.units:
            fixed_in = tuple(_template_in_channels(u, j) for j in range(len(u.inputs)))
            plan = _Plan(u, tuple(zip(u.inputs, u.ports, strict=True)), fixed_in,
                         group_of_unit.get(u.index), {})
            self._plans.append(plan)
        # seed every cache with the template itself (the unpruned network costs no rebuild)
        for plan, key in zip(self._plans, self.channels({}), strict=True):
            plan.cache[key] = plan.unit.specs

    def channels(self, config: Mapping[int, int]) -> list[_Key]:
        """Per unit: (channel count of each input, of each output), as logical channels (a
        flattened input counts its producer's channels, not its features)."""
        defaults = self._defaults
        outs: list[tuple[int, ...]] = []
        result: list[_Key] = []
        for plan in self._plans:
            u = plan.unit
            ins = tuple(outs[s][p] if s >= 0 else plan.fixed_in[j]
                        for j, (s, p) in enumerate(plan.inputs))
            if u.rule == "own":
                out: tuple[int, ...] = (
                    config.get(plan.gid, defaults[plan.gid]) if plan.gid is not None
                    else u.out_channels,)
            elif u.rule == "carry":
                out = (ins[u.carry_from],)
            elif u.rule == "concat":
                out = (sum(ins),)
            else:
                out = u.out_channels_by_port
            outs.append(out)
            result.append((ins, out))
        return result

    def unit_specs(self, index: int, key: _Key) -> tuple[LayerSpec, ...]:
        """The specs of unit `index` at the channel counts `key` (as `channels()` gives them),
        built afresh and not cached: key planning visits millions of them once each."""
        return _materialize(self._plans[index].unit, key)

    def specs(self, config: Mapping[int, int]) -> list[LayerSpec]:
        """The specs of the network pruned to `config` (groups not named keep their count).

        Does not validate `config`; see `validate_config`.
        """
        specs: list[LayerSpec] = []
        for plan, key in zip(self._plans, self.channels(config), strict=True):
            hit = plan.cache.get(key)
            if hit is None:
                hit = plan.cache[key] = _materialize(plan.unit, key)
            specs.extend(hit)
        return specs


def _template_in_channels(u: FusionUnit, j: int) -> int:
    """The channels of input `j` as traced (used for the network input and constants)."""
    if u.core.op is OpKind.NODE:
        shape = u.core.operands[u.operand_index[j]].shape
    else:
        shape = u.core.input_shape
    channels = shape[1] if len(shape) > 1 else 1
    scale = u.scales[j] if j < len(u.scales) and u.scales[j] else 1
    return channels // scale


def _materialize(u: FusionUnit, key: _Key) -> tuple[LayerSpec, ...]:
    """The specs of unit `u` with the channel counts of `key`. Built directly rather than with
    dataclasses.replace + validate: only channel counts change, and this is the planner's hot
    path on a cache miss."""
    ins, outs = key
    if any(c < 1 for c in (*ins, *outs)):
        raise ValueError(f"unit {u.index} ({u.name}) would have {ins} -> {outs} channels")
    if u.core.op is OpKind.NODE:
        return (_materialize_node(u, ins, outs),)
    in_c, out_c = ins[0], outs[0]
    c = u.core
    shape = c.input_shape
    if c.op is OpKind.LINEAR:
        new_shape: tuple[int, ...] = (shape[0], in_c * u.in_scale)
    else:
        new_shape = (shape[0], in_c, *shape[2:])
    is_conv = c.op is OpKind.CONV2D
    core = LayerSpec(  # by keyword: a field added to LayerSpec later cannot shift the others
        op=c.op,
        input_shape=new_shape,
        out_channels=out_c if is_conv or c.op is OpKind.LINEAR else c.out_channels,
        kernel=c.kernel,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=in_c if is_conv and u.is_depthwise else c.groups,
        bias=c.bias,
        batch_norm=c.batch_norm,
        activation=c.activation,
        residual=False,
    )
    return build_specs(core, u.activation, u.residual_add)


def _materialize_node(u: FusionUnit, ins: tuple[int, ...], outs: tuple[int, ...]) -> LayerSpec:
    c = u.core
    if u.rule == "fixed":
        return c
    operands = list(c.operands)
    for j, k in enumerate(u.operand_index):
        o = operands[k]
        if o.kind == "input" and len(o.shape) > 1:
            operands[k] = NodeOperand(kind=o.kind,
                                      shape=(o.shape[0], ins[j] * u.scales[j], *o.shape[2:]))
    template_c = c.out_shapes[0][1]
    scale = u.scales[u.carry_from] if u.rule == "carry" else 1
    new_c = outs[0] * scale
    fed = set(u.operand_index)
    for k, o in enumerate(operands):  # per-channel weights (a BatchNormalization's)
        if k not in fed and o.kind == "weight" and o.shape == (template_c,):
            operands[k] = NodeOperand.weight((new_c,))
    out_shape = c.out_shapes[0]
    return dataclasses.replace(
        c, input_shape=operands[0].shape, operands=tuple(operands),
        out_shapes=((out_shape[0], new_c, *out_shape[2:]),))


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

