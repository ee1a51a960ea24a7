"""From a sum of standalone unit latencies to a whole-network latency.

A unit timed alone pays what the whole network pays once: the session-run call, and on CPU
the layout reorders (NCHW <-> blocked NCHWc) around it; the runtime fuses across units inside
the network; and a unit alone runs with warmer caches: timed over and over, its weights stay
in the cache, while the whole network streams all of its weights through it on every run. So
for a network of N units with standalone latencies u_i and W megabytes of weights:

    whole ≈ overhead + γ · Σ u_i − a · N + b · W

each unit sheds a fixed cost `a`, `γ` scales kernel time and `b` is the time per megabyte of
weights the cache does not hold. The coefficients are fitted by weighted least squares (on
relative error) over a few whole-network measurements stored in the table (kind "model"), once
when the table is loaded, and then used for every estimate — never refitted per query.

**The weights term is off by default** (`fit_correction(..., weights_term=True)` turns it on).
Its coefficient cannot be identified from the calibration networks: they are pruned near
uniformly, so their weights grow in step with their unit sums, and `b` takes over what γ should
carry (one MobileNetV1 table, width 0.5 at 1x28x28: γ = 0.35 and b = 0.048 ms/MB with it,
γ = 0.80 without). On random variants pruned the same way the error stays small, so
`make bench-lut` on random variants favoured the term (fifth day: lower median error in 8 of
10 runs). But NetAdapt asks a table for an order (which proposal saves more), on networks
pruned unevenly, and exploits whatever the estimate attributes wrongly. Measured 2026-12-01
(`make bench-lut`, sixth day; five tables of MobileNetV1, MobileNetV2 and EfficientNet-Lite0):
on the final networks of greedy descents (`host/path_check.py`) the three-term fit ordered 35
of 63 device-resolved pairs right, the two-term fit 53; descents it drove ended slower in 14 of
16 same-seed pairs; on the first table its own descents' networks were estimated 11-21% low,
the two-term fit's 3% low to 5% high. `make run` with the term estimated its final network
41% low. When on, `b` is fitted only from MIN_SAMPLES_WEIGHTS measurements on and kept only
at full rank with `b` >= 0 (streaming weights cannot save time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_server.spec import LayerSpec, OpKind
from lut.store import MODEL_KIND  # LUT rows holding whole-network measurements

__all__ = ["Correction", "CalibrationSample", "fit_correction", "unit_features",
           "MODEL_KIND", "model_row_key", "parse_model_row_key", "architecture_of"]

log = logging.getLogger(__name__)

MIN_SAMPLES = 4
MIN_SAMPLES_WEIGHTS = 6  # a third coefficient needs more than the two-term fit's minimum
# A whole-network measurement whose interval is wider than +-5% is not fitted on: one such
# sample moves the coefficients more than the error the fit is meant to remove.
MAX_CALIBRATION_HALFWIDTH = 0.05
_HALFWIDTH_FLOOR = 0.005  # weights stop growing below +-0.5%: nothing here is known better


@functools.lru_cache(maxsize=1 << 16)
def _weights_mb(spec: LayerSpec) -> float:
    return 4 * spec.param_count() / 1e6  # float32


def unit_features(unit_ms: Sequence[float], specs: Sequence[LayerSpec]
                  ) -> tuple[float, float, float]:
    """(Σ unit ms, unit count, weight MB in float32) of one network."""
    return (float(sum(unit_ms)), float(len(specs)), sum(_weights_mb(s) for s in specs))


@dataclass(frozen=True)
class CalibrationSample:
    features: tuple[float, float, float]  # unit_features of the network
    measured_ms: float            # whole-network robust figure on the device
    overhead_ms: float
    rel_halfwidth: float | None = None  # of its 95% interval; None: unknown (older tables)


@dataclass(frozen=True)
class Correction:
    """whole = overhead + c_sum·Σu + c_units·N + c_weights·W (see the module docstring)."""

    c_sum: float = 1.0
    c_units: float = 0.0
    c_weights: float = 0.0        # ms per MB of weights
    samples: int = 0              # how many whole-network measurements it was fitted on

    def apply(self, overhead_ms: float, features: tuple[float, float, float]) -> float:
        s, n, w = features
        return overhead_ms + self.c_sum * s + self.c_units * n + self.c_weights * w

    @property
    def is_identity(self) -> bool:
        return self.samples == 0


def fit_correction(samples: Sequence[CalibrationSample], weights_term: bool = False
                   ) -> Correction:
    """Weighted least-squares fit on relative error: each network weighs by the inverse of its
    measurement's relative half-width (small or large networks alike); measurements wider than
    MAX_CALIBRATION_HALFWIDTH are refused, and the log says how many.

    With `weights_term` (off by default: the module docstring says why) and at least
    MIN_SAMPLES_WEIGHTS usable measurements, the weights term is fitted too, and kept when the
    three columns are of full rank and its coefficient is >= 0 (the log says when it is
    dropped). With fewer than
    MIN_SAMPLES usable measurements, or a degenerate fit, returns the identity correction (a
    plain sum), and says so in the log.
    """
    noisy = [s for s in samples
             if s.rel_halfwidth is not None and s.rel_halfwidth > MAX_CALIBRATION_HALFWIDTH]
    if noisy:
        log.warning("calibration: %d of %d whole-network measurements refused, their 95%% "
                    "intervals wider than +-%.0f%% (worst +-%.1f%%); measure them again on a "
                    "quieter device", len(noisy), len(samples), 100 * MAX_CALIBRATION_HALFWIDTH,
                    100 * max(s.rel_halfwidth or 0.0 for s in noisy))
        samples = [s for s in samples if s not in noisy]
    if len(samples) < MIN_SAMPLES:
        if samples:
            log.info("only %d whole-network measurements: estimates are plain sums",
                     len(samples))
        return Correction()
    x = np.array([s.features for s in samples], dtype=np.float64)
    y = np.array([s.measured_ms - s.overhead_ms for s in samples], dtype=np.float64)
    halfwidths = np.array([max(s.rel_halfwidth or _HALFWIDTH_FLOOR, _HALFWIDTH_FLOOR)
                           for s in samples])
    w = 1.0 / (np.array([s.measured_ms for s in samples]) * halfwidths)

    def solve(columns: int) -> tuple[np.ndarray, int]:
        # With one architecture N is constant and acts as the intercept.
        coef, _, rank, _ = np.linalg.lstsq(x[:, :columns] * w[:, None], y * w, rcond=None)
        return coef, int(rank)

    if weights_term and len(samples) >= MIN_SAMPLES_WEIGHTS:
        coef, rank = solve(3)
        if rank == 3 and np.all(np.isfinite(coef)) and coef[0] > 0 and coef[2] >= 0:
            return Correction(float(coef[0]), float(coef[1]), float(coef[2]),
                              samples=len(samples))
        log.info("calibration: weights term dropped (rank %d of 3, coefficients %s): the "
                 "networks' weights do not separate from their unit sums", rank, coef)
    coef, _ = solve(2)
    if np.all(np.isfinite(coef)) and coef[0] > 0:
        return Correction(float(coef[0]), float(coef[1]), samples=len(samples))
    # Networks so small that noise swamps the slope: keep γ = 1 and fit the per-unit cost.
    per_unit = (y - x[:, 0]) / x[:, 1]
    c_units = float(np.average(per_unit, weights=w))
    log.info("calibration slope is not identifiable (%s); fitted the per-unit cost only", coef)
    return Correction(1.0, c_units, samples=len(samples))


def model_row_key(specs: Sequence[LayerSpec]) -> str:
    """The LUT key of a whole-network measurement: its units' keys, in order."""
    return json.dumps([json.loads(s.key()) for s in specs], separators=(",", ":"),
                      sort_keys=True)


def parse_model_row_key(key: str) -> list[LayerSpec]:
    return [LayerSpec.from_dict(d) for d in json.loads(key)]


def architecture_of(specs: Sequence[LayerSpec]) -> str:
    """What stays the same when only channel counts change: the calibration of one network
    applies to all its pruned variants."""
    parts = []
    for s in specs:
        shape = (s.input_shape[0], *s.input_shape[2:])
        depthwise = s.groups > 1 and s.groups == s.in_channels
        part: tuple[object, ...] = (s.op.value, shape, s.kernel, s.stride, s.padding,
                                    s.dilation, depthwise, s.batch_norm, s.activation.value,
                                    s.residual, s.bias)
        if s.op is OpKind.NODE:  # e.g. Sigmoid vs HardSigmoid: other networks (other hashes)
            part = (*part, s.node_op, s.attributes)
        parts.append(part)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]

