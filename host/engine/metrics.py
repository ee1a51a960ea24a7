"""The resource a network's units cost: measured latency (from the lookup table), or the
indirect metrics MACs and parameter count that the paper argues against (kept as baselines
driven by the same engine)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from device_server.spec import LayerSpec
from lut.estimator import LatencyEstimator

__all__ = ["Metric", "make_metric"]

Metric = Callable[[Sequence[LayerSpec]], float]


def make_metric(name: str, estimator: LatencyEstimator) -> Metric:
    if name == "latency":
        return estimator.estimate
    if name == "macs":
        return lambda specs: float(sum(s.macs() for s in specs))
    if name == "params":
        return lambda specs: float(sum(s.param_count() for s in specs))
    raise ValueError(f"unknown metric {name!r}; use latency, macs or params")
