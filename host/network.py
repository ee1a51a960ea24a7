"""A network as NetAdapt sees it: the torch model, its fusion units, its prunable groups and the
planner that turns a channel configuration into the units of the pruned network.

`analyse` runs every structural check of `host.graph.analysis` first: a model NetAdapt cannot
adapt is refused in seconds, before anything is trained or measured."""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from device_server.spec import LayerSpec
from host.graph.analysis import analyse_model
from host.graph.groups import (
    ChannelConfig,
    ChannelPlanner,
    KeptGroup,
    PrunableGroup,
    current_config,
)
from host.graph.onnx_export import export_onnx
from host.graph.surgery import apply_config
from host.graph.units import FusionUnit
from host.models.registry import build_model_for

__all__ = ["Network", "load_network", "analyse", "random_config"]

log = logging.getLogger(__name__)


@dataclass
class Network:
    name: str
    model: nn.Module
    input_shape: tuple[int, int, int, int]     # (N, C, H, W)
    units: list[FusionUnit]
    groups: list[PrunableGroup]
    planner: ChannelPlanner
    kept: list[KeptGroup] = dataclasses.field(default_factory=list)  # groups left unpruned
    warnings: list[str] = dataclasses.field(default_factory=list)  # from the analysis

    def with_model(self, model: nn.Module) -> Network:
        """This network with other weights of the same structure (e.g. the trained base).

        Raises:
            ValueError: `model` has other channel counts than this network.
        """
        try:
            same = current_config(model, self.groups) == self.full_config()
        except (KeyError, AttributeError):
            same = False
        if not same:
            raise ValueError(f"the model given for {self.name} has another structure than the "
                             f"one analysed")
        return dataclasses.replace(self, model=model)

    def full_config(self) -> ChannelConfig:
        return {g.id: g.channels for g in self.groups}

    def specs(self, config: Mapping[int, int] | None = None) -> list[LayerSpec]:
        """The fusion units of the network pruned to `config` (unpruned when None)."""
        return self.planner.specs(config or {})

    def pruned(self, config: Mapping[int, int], importance: str = "l2") -> nn.Module:
        """A pruned copy (lowest-norm filters removed); the network itself is unchanged."""
        return apply_config(self.model, dict(config), self.groups,
                            input_shape=self.input_shape, importance=importance)

    def onnx(self, config: Mapping[int, int] | None = None) -> bytes:
        model = self.pruned(config) if config else self.model
        return export_onnx(model, self.input_shape)


def analyse(name: str, model: nn.Module, input_shape: Sequence[int]) -> Network:
    """Checks `model` (see `host.graph.analysis`) and traces it into fusion units and prunable
    groups; warnings are logged once each. The model is put in eval mode.

    Raises:
        UnsupportedLayerError: the model cannot be adapted: a layer the analysis cannot handle,
            outputs that are not logits, nothing trainable or nothing prunable (named in the
            one-line message).
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 4:
        raise ValueError(f"input shape must be (N, C, H, W), got {list(shape)}")
    report = analyse_model(model, shape)
    model.eval()
    groups = report.groups.groups
    return Network(name, model, shape, report.units, groups,  # type: ignore[arg-type]
                   ChannelPlanner(report.units, groups), report.groups.kept, report.warnings)


def load_network(name: str, input_shape: Sequence[int] = (1, 1, 28, 28),
                 num_classes: int = 10) -> Network:
    """A built-in or `package.module:factory` model sized for (N, C, H, W) inputs."""
    chw = (int(input_shape[1]), int(input_shape[2]), int(input_shape[3]))
    model = build_model_for(name, chw, num_classes)
    return analyse(name, model, input_shape)


def random_config(groups: Sequence[PrunableGroup], rng: random.Random, step: int = 8,
                  low: float = 0.3, keep: float | None = None) -> ChannelConfig:
    """A random pruned variant on the grid: a global keep fraction (`keep`, or uniform in
    [low, 1]) and +-20% per group, so variants range from barely to heavily pruned."""
    keep = rng.uniform(low, 1.0) if keep is None else keep
    config: ChannelConfig = {}
    for g in groups:
        if g.channels <= step:
            config[g.id] = g.channels
            continue
        target = g.channels * keep * rng.uniform(0.8, 1.2)
        config[g.id] = min(g.channels, max(step, int(round(target / step)) * step))
    return config
