"""Whole-network latency from a lookup table: the engine's inner-loop metric.

`estimate(specs)` = per-call session overhead + the calibrated sum of fusion-unit latencies
(see `lut.calibration`). Lookups are dictionary hits on frozen `LayerSpec`s, so an estimate of
a 50-unit network costs tens of microseconds. A unit the table lacks is, in order:
  1. measured on demand, when the estimator has a `fetch` callback (on-demand mode: the engine
     can start without a full table; what is fetched is stored and kept);
  2. interpolated from its neighbours on the channel grid (never a model refitted per query);
  3. refused with `LutMissingKeyError` naming the unit.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from device_server.spec import LayerSpec
from lut.calibration import (
    MIN_SAMPLES,
    MODEL_KIND,
    CalibrationSample,
    Correction,
    architecture_of,
    fit_correction,
    parse_model_row_key,
    unit_features,
)
from lut.errors import LutError
from lut.store import LutStore

__all__ = ["LatencyEstimator", "LutMissingKeyError", "OVERHEAD_KIND", "OVERHEAD_KEY", "Fetch"]

log = logging.getLogger(__name__)

OVERHEAD_KIND = "overhead"
OVERHEAD_KEY = "identity"

Fetch = Callable[[Sequence[LayerSpec]], Mapping[LayerSpec, float]]
"""Measures specs the table lacks (and stores them); returns their medians in ms."""

_Family = tuple[object, ...]


class LutMissingKeyError(LutError, KeyError):
    """The table has neither the unit nor neighbours to interpolate it from."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _node_family(d: Mapping[str, Any]) -> tuple[_Family, int, int]:
    """A NODE unit's family: its dict with the input's channel count written "C" wherever it
    appears as a channel (axis 1 of a tensor, the length of a per-channel weight) and the
    output's written "K"; what remains (op, attributes, spatial sizes, other inputs) is fixed."""
    shape = list(d["input_shape"])
    cin = int(shape[1]) if len(shape) > 1 else 1
    out = list(d["out_shapes"][0])
    cout = int(out[1]) if len(out) > 1 else 1

    def channels(dims: list[int], value: int, mark: str) -> list[object]:
        axis = 1 if len(dims) > 1 else 0
        return [mark if i == axis and v == value else v for i, v in enumerate(dims)]

    operands = [{**o, "shape": channels(list(o["shape"]), cin, "C")} if o["kind"] != "const"
                else o for o in d["operands"]]
    abstract = {**d, "input_shape": channels(shape, cin, "C"), "operands": operands,
                "out_shapes": [channels(list(o), cout, "K") for o in d["out_shapes"]]}
    return (("node", json.dumps(abstract, sort_keys=True)),), cin, cout


def _family(d: Mapping[str, object]) -> tuple[_Family, int, int]:
    """(what stays fixed when channels change, in channels, out channels) of a spec dict."""
    if d.get("op") == "node":
        return _node_family(d)
    shape = list(d["input_shape"])  # type: ignore[call-overload]
    cin = int(shape[1])
    cout = int(d.get("out_channels") or 0)  # type: ignore[call-overload]
    groups = int(d.get("groups") or 1)  # type: ignore[call-overload]
    depthwise = groups > 1 and groups == cin
    rest = tuple((k, json.dumps(v)) for k, v in sorted(d.items())
                 if k not in ("input_shape", "out_channels", "groups"))
    fam = (tuple(shape[:1] + shape[2:]), depthwise, groups if not depthwise else 0, rest)
    return fam, cin, cout


@dataclass
class _Grid:
    """Latencies of one family on its (in, out) channel grid."""

    points: dict[tuple[int, int], float]

    def interpolate(self, cin: int, cout: int) -> float | None:
        if cin == cout and all(a == b for a, b in self.points):
            # Depthwise: one channel count sets both sides; interpolate along the diagonal.
            lo, hi = _bracket(sorted(a for a, _ in self.points), cin)
            if lo is None or hi is None:
                return None
            t = 0.0 if hi == lo else (cin - lo) / (hi - lo)
            return self.points[(lo, lo)] * (1 - t) + self.points[(hi, hi)] * t
        ins = sorted({c for c, _ in self.points})
        outs = sorted({c for _, c in self.points})
        i_lo, i_hi = _bracket(ins, cin)
        o_lo, o_hi = _bracket(outs, cout)
        if None in (i_lo, i_hi, o_lo, o_hi):
            return None
        corners = [(a, b) for a in {i_lo, i_hi} for b in {o_lo, o_hi}]  # type: ignore[misc]
        if not all(c in self.points for c in corners):
            return None
        ti = 0.0 if i_hi == i_lo else (cin - i_lo) / (i_hi - i_lo)  # type: ignore[operator]
        to = 0.0 if o_hi == o_lo else (cout - o_lo) / (o_hi - o_lo)  # type: ignore[operator]
        p = self.points
        low_in = p[(i_lo, o_lo)] * (1 - to) + p[(i_lo, o_hi)] * to  # type: ignore[index]
        high_in = p[(i_hi, o_lo)] * (1 - to) + p[(i_hi, o_hi)] * to  # type: ignore[index]
        return float(low_in * (1 - ti) + high_in * ti)


def _bracket(values: list[int], x: int) -> tuple[int | None, int | None]:
    if not values or x < values[0] or x > values[-1]:
        return None, None
    i = bisect.bisect_left(values, x)
    if values[i] == x:
        return x, x
    return values[i - 1], values[i]


class LatencyEstimator:
    """Estimates whole-network latency (ms) from unit latencies of one table."""

    def __init__(
        self,
        medians: Mapping[str, float],
        overhead_ms: float,
        correction: Correction | None = None,
        fetch: Fetch | None = None,
        interpolate: bool = True,
    ) -> None:
        self._by_key = dict(medians)
        self._by_spec: dict[LayerSpec, float] = {}
        self.overhead_ms = overhead_ms
        self.correction = correction or Correction()
        self.fetch = fetch
        self.interpolate = interpolate
        self._grids: dict[_Family, _Grid] | None = None
        self.fetched = 0        # units measured on demand through this estimator
        self.interpolated = 0   # lookups answered by interpolation

    @classmethod
    def from_store(cls, store: LutStore, fetch: Fetch | None = None,
                   interpolate: bool = True, architecture: str | None = None
                   ) -> LatencyEstimator:
        """Loads medians, overhead and the calibration rows of `store`.

        With `architecture` (see `lut.calibration.architecture_of`), the correction is fitted
        on that network's whole-network rows when the table has enough of them.

        Raises:
            LutError: the table has no overhead row (it was not built by `lut build`).
        """
        overhead = store.get(OVERHEAD_KEY, kind=OVERHEAD_KIND)
        if overhead is None:
            raise LutError(
                f"{store.path} has no per-call overhead measurement; build it with "
                f"`netadapt-host lut build`"
            )
        est = cls(store.load_values(), overhead.robust_ms, fetch=fetch, interpolate=interpolate)
        est.correction = fit_correction(est.calibration_samples(store, architecture))
        return est

    def calibration_samples(self, store: LutStore, architecture: str | None = None
                            ) -> list[CalibrationSample]:
        """Whole-network rows of the table as fitting samples: those of `architecture` when
        there are enough, else all of them."""
        rows = [(parse_model_row_key(r.key), r.timing) for r in store.all_rows(kind=MODEL_KIND)]
        if architecture is not None:
            mine = [r for r in rows if architecture_of(r[0]) == architecture]
            if len(mine) >= MIN_SAMPLES:
                rows = mine
        samples = []
        for specs, timing in rows:
            try:
                units = self.unit_latencies(specs)
            except LutMissingKeyError:
                continue
            samples.append(CalibrationSample(unit_features(units, specs),
                                             timing.robust_ms, self.overhead_ms,
                                             timing.rel_halfwidth if timing.value_ms > 0
                                             else None))
        return samples

    def refit(self, samples: Sequence[CalibrationSample], weights_term: bool = False
              ) -> Correction:
        """Fits the correction on `samples` (see `lut.calibration.fit_correction`)."""
        self.correction = fit_correction(samples, weights_term)
        return self.correction

    # -- lookups ------------------------------------------------------------------------
    def add(self, medians: Mapping[LayerSpec, float]) -> None:
        """Adds measured units (e.g. fetched on demand by the caller)."""
        for spec, ms in medians.items():
            self._by_spec[spec] = ms
            self._by_key[spec.key()] = ms
        self._grids = None

    def unit_latencies(self, specs: Sequence[LayerSpec]) -> list[float]:
        by_spec = self._by_spec
        out: list[float] = []
        missing: list[LayerSpec] = []
        for s in specs:
            v = by_spec.get(s)
            if v is None:
                v = self._by_key.get(s.key())
                if v is None:
                    missing.append(s)
                    out.append(-1.0)
                    continue
                by_spec[s] = v
            out.append(v)
        if missing:
            resolved = self._resolve(missing)
            out = [v if v >= 0 else resolved[s] for v, s in zip(out, specs, strict=True)]
        return out

    def unit_ms(self, spec: LayerSpec) -> float:
        return self.unit_latencies([spec])[0]

    def raw_sum(self, specs: Sequence[LayerSpec]) -> float:
        """The naive figure: the plain sum of standalone unit latencies."""
        return sum(self.unit_latencies(specs))

    def estimate(self, specs: Sequence[LayerSpec], correction: Correction | None = None,
                 overrides: Mapping[LayerSpec, float] | None = None) -> float:
        """Estimated whole-network latency (ms) of a network made of `specs`, under the table's
        correction or another fitted on the same table (e.g. to compare fits).

        `overrides`: unit latencies (ms) to use in place of the table's for those units, e.g.
        units measured again side by side (`host.engine.savings`); the table is unchanged."""
        units = self.unit_latencies(specs)
        if overrides:
            units = [overrides.get(s, u) for s, u in zip(specs, units, strict=True)]
        return (correction or self.correction).apply(self.overhead_ms,
                                                     unit_features(units, specs))

    def missing(self, specs: Sequence[LayerSpec]) -> list[LayerSpec]:
        """Specs the table lacks (before any interpolation or fetching)."""
        return list(dict.fromkeys(
            s for s in specs if s not in self._by_spec and s.key() not in self._by_key))

    # -- misses -------------------------------------------------------------------------
    def _resolve(self, missing: list[LayerSpec]) -> dict[LayerSpec, float]:
        unique = list(dict.fromkeys(missing))
        if self.fetch is not None:
            got = dict(self.fetch(unique))
            self.fetched += len(got)
            self.add(got)
            unique = [s for s in unique if s not in got]
            if not unique:
                return got
        else:
            got = {}
        for s in unique:
            value = self._interpolate(s) if self.interpolate else None
            if value is None:
                raise LutMissingKeyError(
                    f"the lookup table has no entry for {s.describe()} and no neighbours on "
                    f"the channel grid to interpolate it from; build the table for this model "
                    f"(netadapt-host lut build) or use on-demand mode. Key: {s.key()}"
                )
            self.interpolated += 1
            self._by_spec[s] = value
            got[s] = value
        return got

    def _interpolate(self, spec: LayerSpec) -> float | None:
        if self._grids is None:
            grids: dict[_Family, _Grid] = {}
            for key, ms in self._by_key.items():
                if not key.startswith("{"):
                    continue
                fam, cin, cout = _family(json.loads(key))
                grids.setdefault(fam, _Grid({})).points[(cin, cout)] = ms
            self._grids = grids
        fam, cin, cout = _family(spec.to_dict())
        grid = self._grids.get(fam)
        return None if grid is None else grid.interpolate(cin, cout)
