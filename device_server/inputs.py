"""What a whole model is fed when it is timed: per input, exact values or a range to draw
random values from; by default random values within what the model's own graph can take.

A model whose integer input indexes a table (a Gather's indices: token ids, embedding lookups,
class ids) fails on random values outside the table. `graph_ranges` reads such limits from the
graph: an integer input used, directly or through Cast/Reshape/Unsqueeze/Squeeze/Flatten, as
the indices of a Gather whose data has a known size on its axis gets [0, size - 1]. Boolean
inputs get {0, 1}; other integer inputs [0, 1]; floating-point inputs standard normal values.

No torch; numpy, and onnx only when a graph is read (the client side, which sends feeds,
imports neither torch nor onnx).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from device_server.errors import InvalidConfigError

if TYPE_CHECKING:
    import onnx

__all__ = ["InputFeed", "graph_ranges", "make_input", "feeds_key", "NUMPY_TYPES"]

log = logging.getLogger(__name__)

NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_DTYPES = {np.dtype(t).name: t for t in NUMPY_TYPES.values()}
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}


@dataclass(frozen=True, kw_only=True)
class InputFeed:
    """How one input is fed: `values` exactly (their shape wins), or random values drawn
    uniformly in [low, high] (integers: both inclusive)."""

    values: np.ndarray | None = None
    low: float = 0.0
    high: float = 1.0
    integer: bool = False

    def __post_init__(self) -> None:
        if self.values is None and self.high < self.low:
            raise InvalidConfigError(f"input range {self.low}..{self.high} is empty: low must "
                                     f"not exceed high")

    @classmethod
    def range(cls, low: float, high: float, integer: bool = False) -> InputFeed:
        return cls(values=None, low=float(low), high=float(high), integer=integer)

    def describe(self) -> str:
        if self.values is not None:
            return f"the values given ({self.values.dtype.name} {list(self.values.shape)})"
        kind = "int" if self.integer else "float"
        low, high = (int(self.low), int(self.high)) if self.integer else (self.low, self.high)
        return f"random {kind} in {low}..{high}"

    def digest(self) -> str:
        h = hashlib.sha256()
        if self.values is not None:
            h.update(self.values.dtype.name.encode())
            h.update(repr(self.values.shape).encode())
            h.update(np.ascontiguousarray(self.values).tobytes())
        else:
            h.update(f"{self.low}:{self.high}:{self.integer}".encode())
        return h.hexdigest()[:16]


def feeds_key(feeds: Mapping[str, InputFeed] | None) -> str:
    """A short identity of the feeds, for session caches (sessions bind their inputs once)."""
    if not feeds:
        return ""
    return ";".join(f"{name}={feeds[name].digest()}" for name in sorted(feeds))


def _dims(value: Any) -> list[int]:
    return [d.dim_value for d in value.type.tensor_type.shape.dim]


def graph_ranges(model_bytes: bytes) -> dict[str, InputFeed]:
    """Default feeds the graph tells: integer inputs that index a Gather's data get that
    data's valid range. Inputs the graph says nothing about are left out.

    A model that cannot be parsed gives no ranges (ONNX Runtime reports its problems).
    """
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception:  # noqa: BLE001 - the session creation reports a bad model
        return {}
    graph = model.graph
    shapes: dict[str, list[int]] = {t.name: list(t.dims) for t in graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        for v in (*inferred.value_info, *inferred.input, *inferred.output):
            shapes.setdefault(v.name, _dims(v))
    except Exception:  # noqa: BLE001 - shape inference is a help, not a requirement
        pass
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    out: dict[str, InputFeed] = {}
    initializers = {t.name for t in graph.initializer}
    for inp in graph.input:
        if inp.name in initializers:
            continue
        elem = inp.type.tensor_type.elem_type
        if elem == onnx.TensorProto.BOOL:
            out[inp.name] = InputFeed.range(0, 1, integer=True)
            continue
        if elem not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16,
                        onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            continue
        limit = _index_limit(inp.name, consumers, shapes, set())
        if limit is not None and limit > 0:
            out[inp.name] = InputFeed.range(0, limit - 1, integer=True)
    return out


def _index_limit(name: str, consumers: Mapping[str, list[tuple[Any, int]]],
                 shapes: Mapping[str, list[int]], seen: set[str]) -> int | None:
    """The smallest table size `name` indexes (through pass-through ops), if readable."""
    if name in seen:
        return None
    seen.add(name)
    limits: list[int] = []
    for node, position in consumers.get(name, []):
        if node.op_type in ("Gather", "GatherElements") and position == 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            data = shapes.get(node.input[0])
            if data:
                size = data[axis % len(data)]
                if size > 0:
                    limits.append(size)
        elif node.op_type in _PASS_THROUGH and position == 0:
            for output in node.output:
                limit = _index_limit(output, consumers, shapes, seen)
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


def make_input(name: str, ort_type: str, dims: tuple[int, ...], feed: InputFeed | None,
               rng: np.random.Generator) -> np.ndarray:
    """The array bound to one input: its feed's values (cast to the input's type), a random
    draw in its feed's range, or standard normal values.

    Raises:
        InvalidConfigError: unsupported input type, or values of another rank.
    """
    dtype = NUMPY_TYPES.get(ort_type)
    if dtype is None:
        raise InvalidConfigError(f"input {name!r} has unsupported type {ort_type}")
    if feed is not None and feed.values is not None:
        values = np.asarray(feed.values)
        if values.ndim != len(dims):
            raise InvalidConfigError(
                f"input {name!r} takes rank {len(dims)} {list(dims)}; the values given have "
                f"shape {list(values.shape)}")
        return np.ascontiguousarray(values.astype(dtype))
    if feed is None:
        return rng.standard_normal(dims).astype(dtype)
    if feed.integer or np.issubdtype(dtype, np.integer) or dtype is np.bool_:
        low, high = int(np.ceil(feed.low)), int(np.floor(feed.high))
        if high < low:
            raise InvalidConfigError(f"input {name!r}: no integer in {feed.low}..{feed.high}")
        return rng.integers(low, high + 1, size=dims).astype(dtype)
    return rng.uniform(feed.low, feed.high, size=dims).astype(dtype)


def dtype_named(name: str) -> type[np.generic]:
    """The numpy type of a dtype name ("int64", "float32", ...).

    Raises:
        InvalidConfigError: an unknown name.
    """
    try:
        return _DTYPES[np.dtype(name).name]
    except (TypeError, KeyError):
        raise InvalidConfigError(
            f"unknown dtype {name!r}; use one of {', '.join(sorted(_DTYPES))}") from None
