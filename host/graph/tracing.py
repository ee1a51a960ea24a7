"""torch.fx tracing with real shapes: the graph a model runs as, every tensor annotated.

`trace(model, example)` traces with every conv/linear/BN/pool/activation instance kept as one
node (so `nn.Conv2d` subclasses such as EfficientNet's "static same padding" convs stay one
node), then runs the graph once on `example` and records on each node:

* `shape_of(node)`: the shape of a tensor result;
* `shapes_of(node)`: the shapes of a tuple/list of tensors (what `chunk` and `split` return);
* `aliases_input(node)`: the result *is* one of the node's tensor arguments (an op that is an
  identity in eval mode, such as torchvision's stochastic depth, or an in-place op).

A failure names the layer it happened in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["TraceError", "trace", "shape_of", "shapes_of", "aliases_input", "where"]

_SHAPE = "netadapt_shape"
_SHAPES = "netadapt_shapes"
_ALIAS = "netadapt_alias"

# Kept as one node each (subclasses included); torch.nn's own modules are leaves anyway.
_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.SiLU,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.Flatten,
)


class TraceError(ValueError):
    """The model cannot be traced or its forward fails on the example; the message names the
    layer."""


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps every conv/linear/BN/pool/activation instance as one node, and
    remembers which module it was inside when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.module_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LEAF_TYPES) or super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.module_path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.module_path.pop()


class _ShapeProp(fx.Interpreter):
    """Runs the graph once and records result shapes and aliasing on each node; remembers the
    node it is running, for error messages."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[_SHAPE] = tuple(int(d) for d in result.shape)
            if n.op in ("call_function", "call_method", "call_module"):
                args = self.fetch_args_kwargs_from_env(n)[0]
                n.meta[_ALIAS] = any(a is result for a in args if isinstance(a, torch.Tensor))
        elif (
            isinstance(result, (tuple, list))
            and result
            and all(isinstance(r, torch.Tensor) for r in result)
        ):
            n.meta[_SHAPES] = tuple(tuple(int(d) for d in r.shape) for r in result)
        return result


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """The fx graph of `model` (its mode as it is), every node annotated from one run on
    `example`.

    Raises:
        TraceError: fx cannot trace the model, or its forward fails on `example`; the message
            names the layer.
    """
    tracer = _LeafTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types; re-raise with the layer
        at = tracer.module_path[-1] if tracer.module_path else "<top level>"
        raise TraceError(
            f"torch.fx cannot trace layer {at!r} ({type(exc).__name__}: {exc}); make its "
            f"forward free of data-dependent control flow, or use supported layers"
        ) from exc
    gm = fx.GraphModule(model, graph)
    prop = _ShapeProp(gm)
    try:
        with torch.no_grad():
            prop.run(example)
    except Exception as exc:  # noqa: BLE001 - any failure of the model's own forward
        at = where(prop.current) if prop.current is not None else "the model"
        first_line = (str(exc).splitlines() or [""])[0]
        raise TraceError(
            f"running {at} on an input of shape {tuple(example.shape)} failed: "
            f"{type(exc).__name__}: {first_line}"
        ) from exc
    return gm


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The traced shape of a tensor-valued node; None for anything else."""
    if not isinstance(node, fx.Node):
        return None
    shape = node.meta.get(_SHAPE)
    return shape if isinstance(shape, tuple) else None


def shapes_of(node: Any) -> tuple[tuple[int, ...], ...] | None:
    """The traced shapes of a node that returns a tuple or list of tensors."""
    if not isinstance(node, fx.Node):
        return None
    shapes = node.meta.get(_SHAPES)
    return shapes if isinstance(shapes, tuple) else None


def aliases_input(node: fx.Node) -> bool:
    """The node's result is one of its own tensor arguments (the same tensor object)."""
    return bool(node.meta.get(_ALIAS))


def where(node: fx.Node) -> str:
    """The layer a node belongs to, for messages."""
    if node.op == "call_module":
        return f"layer {node.target!r}"
    stack = node.meta.get("nn_module_stack")
    inside = f" inside {list(stack)[-1]!r}" if stack else ""
    return f"op {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)}){inside}"
