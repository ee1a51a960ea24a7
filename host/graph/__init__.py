"""The torch side of a network's structure: fusion units as the runtime executes them
(`units`, with `tracing` and the NODE op registry `node_ops`), prunable channel groups and
channel configurations (`groups`), filter pruning (`surgery`), ONNX export (`onnx_export`) and
the checks that run before any training or measuring (`analysis`)."""

from host.graph.groups import (
    MAX_CONCAT_GROUPS,
    ChannelConfig,
    ChannelPlanner,
    GroupReport,
    KeptGroup,
    PrunableGroup,
    analyse_groups,
    build_dependency_graph,
    current_config,
    find_groups,
    units_for_config,
    validate_config,
)
from host.graph.onnx_export import check_onnx, export_onnx
from host.graph.surgery import (
    Importance,
    apply_config,
    filter_importance,
    make_divisible,
    prune_group,
    uniform_width_config,
)
from host.graph.units import (
    CONSTANT_SOURCE,
    INPUT_SOURCE,
    FusionUnit,
    UnsupportedLayerError,
    build_specs,
    extract_units,
    unit_specs,
)

__all__ = [
    "CONSTANT_SOURCE",
    "ChannelConfig",
    "ChannelPlanner",
    "FusionUnit",
    "GroupReport",
    "INPUT_SOURCE",
    "Importance",
    "KeptGroup",
    "MAX_CONCAT_GROUPS",
    "PrunableGroup",
    "UnsupportedLayerError",
    "analyse_groups",
    "apply_config",
    "build_dependency_graph",
    "build_specs",
    "check_onnx",
    "current_config",
    "export_onnx",
    "extract_units",
    "filter_importance",
    "find_groups",
    "make_divisible",
    "prune_group",
    "uniform_width_config",
    "unit_specs",
    "units_for_config",
    "validate_config",
]
