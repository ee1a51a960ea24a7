"""`netadapt-host lut …`: build, validate, inspect, export and import lookup tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from device_server.spec import SessionSpec
from host.cli.common import (
    CommandError,
    add_device_options,
    add_model_options,
    add_protocol_options,
    load_network_from_args,
    pool_from_args,
    protocol_from_args,
    session_from_args,
)
from host.device.client import DeviceError
from host.device.plan_estimate import estimate_plan, format_duration
from host.device.pool import DevicePool
from host.device.table_builder import DriftGuard, NoiseGuard, build_table, identity_for
from host.device.watch import DeviceWatch, WatchLimits
from host.lut_validation import LATE_PASS_REPORTED, calibrate, validate
from host.network import Network
from host.progress import Progress
from lut.estimator import LatencyEstimator
from lut.exchange import export_csv, export_json, import_file
from lut.keys import DEFAULT_MAX_KEYS, PlanTooLarge, plan_keys
from lut.store import LutStore

__all__ = ["add_lut_commands", "default_lut_path", "announce_on_demand"]

log = logging.getLogger(__name__)


def default_lut_path(pool: DevicePool, session: SessionSpec) -> Path:
    """One file per measurement conditions, under .netadapt/ in the working directory."""
    resolved = session.with_threads(pool.info.default_threads)
    provider = resolved.provider.removesuffix("ExecutionProvider").lower()
    name = (f"lut-{pool.info.fingerprint}-{provider}-t{resolved.intra_op_threads}-"
            f"ort{pool.info.ort_version}.sqlite")
    return Path(os.environ.get("NETADAPT_HOME", ".netadapt")) / name


def open_store(args: argparse.Namespace, pool: DevicePool, session: SessionSpec,
               batch_size: int) -> LutStore:
    path = Path(args.lut) if args.lut else default_lut_path(pool, session)
    path.parent.mkdir(parents=True, exist_ok=True)
    return LutStore.open(path, identity_for(pool.info, session, batch_size),
                         allow_mismatch=args.allow_mismatch)


def add_lut_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lut = sub.add_parser("lut", help="lookup tables of measured layer latencies")
    cmds = lut.add_subparsers(dest="lut_command", required=True)

    b = cmds.add_parser("build", help="measure every unit a network may need")
    add_model_options(b)
    add_device_options(b, tls=True)
    _add_lut_path(b)
    b.add_argument("--step", type=int, default=8, help="channel grid step (default 8)")
    b.add_argument("--max-keys", type=int, default=DEFAULT_MAX_KEYS,
                   help=f"refuse a plan of more distinct keys (default {DEFAULT_MAX_KEYS:,})")
    b.add_argument("--calibrate", type=int, default=10,
                   help="whole-network measurements for the correction (default 10)")
    b.add_argument("--seed", type=int, default=0, help="order in which keys are measured")
    b.add_argument("--window", type=int, default=DriftGuard.window,
                   help="keys between drift checks")
    b.add_argument("--drift-threshold", type=float, default=DriftGuard.threshold,
                   help="relative move of the reference layer that re-measures a window")
    b.add_argument("--passes", type=int, default=NoiseGuard.passes,
                   help="measure every key this many times, in different orders, and keep the "
                        "fastest (2 removes most bursts of other load; doubles the build time)")
    b.add_argument("--cooldown-s", type=float, default=DriftGuard.cooldown_s,
                   help="on drift or heat, pause up to this long for the device to cool down "
                        "before re-measuring (default: do not pause)")
    b.add_argument("--max-temp-rise", type=float, default=WatchLimits.max_temp_rise_c,
                   help="°C above a zone's first reading that counts as too hot")
    b.set_defaults(run=_build)

    v = cmds.add_parser("validate", help="estimates vs whole-network measurements")
    add_model_options(v)
    add_device_options(v, tls=True)
    _add_lut_path(v)
    v.add_argument("--variants", type=int, default=20,
                   help="random pruned variants estimated and measured whole")
    add_protocol_options(v)
    v.add_argument("--calibrate", type=int, default=10,
                   help="whole networks measured to fit the estimator's correction")
    v.add_argument("--step", type=int, default=8,
                   help="channel grid of the variants (multiples of this)")
    v.add_argument("--seed", type=int, default=0, help="which random variants")
    v.set_defaults(run=_validate)

    i = cmds.add_parser("info", help="what a table holds and what it is valid for")
    i.add_argument("lut_file")
    i.add_argument("--json", action="store_true", help="print the information as JSON")
    i.set_defaults(run=_info)

    e = cmds.add_parser("export", help="write a table as CSV or JSON (by extension)")
    e.add_argument("lut_file")
    e.add_argument("output")
    e.set_defaults(run=_export)

    m = cmds.add_parser("import", help="merge a CSV/JSON export into a table")
    m.add_argument("lut_file")
    m.add_argument("input")
    m.add_argument("--allow-mismatch", action="store_true",
                   help="merge rows measured under other conditions (with a warning)")
    m.set_defaults(run=_import)


def _add_lut_path(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lut", help="table file (default: .netadapt/lut-<device>-….sqlite)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a table measured under other conditions (with a warning)")
    p.add_argument("--json", action="store_true", help="print a JSON report")


def _build(args: argparse.Namespace, out: TextIO) -> int:
    if args.passes < 1:
        raise CommandError(f"--passes must be >= 1, got {args.passes}")
    if args.step < 1 or args.max_keys < 1:
        raise CommandError("--step and --max-keys must be >= 1")
    network = load_network_from_args(args)
    session = session_from_args(args)
    t0 = time.monotonic()
    try:
        plan = plan_keys(network.planner, step=args.step, max_keys=args.max_keys)
    except PlanTooLarge as exc:
        raise CommandError(f"{network.name}: {exc}") from None
    planned_s = time.monotonic() - t0
    with pool_from_args(args) as pool, \
            open_store(args, pool, session, network.input_shape[0]) as store:
        estimate = estimate_plan(store, pool, plan.specs, plan.entries, session,
                                 passes=args.passes, seed=args.seed)
        sys.stderr.write(f"netadapt-host: {network.name} at --step {args.step} (planned in "
                         f"{planned_s:.1f} s): {estimate.describe()}\n")
        sys.stderr.flush()
        try:
            report = build_table(store, pool, plan.specs, session, seed=args.seed,
                                 drift=DriftGuard(window=args.window,
                                                  threshold=args.drift_threshold,
                                                  cooldown_s=args.cooldown_s),
                                 watch=DeviceWatch.for_session(
                                     session, pool.info.default_threads,
                                     WatchLimits(max_temp_rise_c=args.max_temp_rise)),
                                 noise=NoiseGuard(passes=args.passes),
                                 progress=Progress.for_stderr(enabled=not args.json))
        except DeviceError as exc:  # the device went away mid-build: say what is kept
            raise DeviceError(
                exc.code, f"{exc.message}; the {store.count('unit')} rows in {store.path} are "
                f"kept: run the same command again once the device is back (it measures only "
                f"what is missing)", exc.address) from None
        calibrated = calibrate(store, pool, network, session, args.calibrate, args.seed,
                               args.step)
        result = {
            "lut": str(store.path),
            "network": network.name,
            "entries": plan.entries,
            "distinct_keys": len(plan),
            "plan": estimate.to_dict() | {"planning_s": round(planned_s, 2)},
            "already_present": estimate.present,
            "measured": report.measured + estimate.sampled,
            "failed": len(report.failed),
            "remeasured": report.remeasured,
            "drift_events": report.drift_events,
            "device_state_warnings": report.state_warnings,
            "cooldowns_s": [round(c, 1) for c in report.cooldowns],
            "whole_network_measurements": calibrated,
            "seconds": round(report.seconds, 1),
            "devices": [{"address": d.address, "measured": d.measured,
                         "keys_per_s": round(d.per_second, 1), "lost": d.lost}
                        for d in report.devices],
        }
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    else:
        out.write(f"{result['lut']}: {network.name} needs {plan.entries} entries, "
                  f"{len(plan)} distinct keys; {estimate.present} already there, "
                  f"{result['measured']} measured in {report.seconds:.0f} s"
                  f"{f', {len(report.failed)} failed' if report.failed else ''}\n")
        for d in result["devices"]:  # type: ignore[attr-defined]
            out.write(f"  {d['address']}: {d['measured']} keys, {d['keys_per_s']} keys/s"
                      f"{'  LOST: ' + d['lost'] if d['lost'] else ''}\n")
        for event in report.drift_events:
            out.write(f"  drift: {event}\n")
        for warning in report.state_warnings:
            out.write(f"  device: {warning}\n")
    return 1 if report.failed else 0


def announce_on_demand(store: LutStore, pool: DevicePool, network: Network, session: SessionSpec,
                       step: int, err: TextIO | None = None) -> None:
    """For a run that fills its table on demand: how many keys it may need, how many the table
    has, and what each costs on this device (from a few measured now, and kept)."""
    err = err or sys.stderr
    try:
        plan = plan_keys(network.planner, step=step, max_keys=DEFAULT_MAX_KEYS)
    except PlanTooLarge as exc:
        err.write(f"netadapt-host: on-demand table: {network.name} at --step {step} may need "
                  f"at least {exc.at_least:,} keys (up to {exc.entries:,}); the engine measures "
                  f"only those it needs, as it goes\n")
        return
    estimate = estimate_plan(store, pool, plan.specs, plan.entries, session, sample=8)
    line = (f"netadapt-host: on-demand table: {network.name} at --step {step} may need up to "
            f"{estimate.keys:,} keys, {estimate.present:,} already in the table; the engine "
            f"measures those it needs as it goes")
    if estimate.keys_per_s and estimate.eta_s is not None:
        line += (f" (~{1e3 / estimate.keys_per_s:.0f} ms each on this device, "
                 f"~{format_duration(estimate.eta_s)} if it needed all {estimate.to_measure:,})")
    err.write(line + "\n")
    err.flush()


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    if args.variants < 1:
        raise CommandError("--variants must be >= 1")
    protocol = protocol_from_args(args)
    network = load_network_from_args(args)
    session = session_from_args(args)
    with pool_from_args(args) as pool, \
            open_store(args, pool, session, network.input_shape[0]) as store:
        report = validate(store, pool, network, session, args.variants, args.seed, args.step,
                          args.calibrate, protocol)
        lut_path = str(store.path)
    data = report.to_dict()
    data["lut"] = lut_path
    if args.json:
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    out.write(f"{'variant':>7} {'estimated ms':>13} {'measured ms':>12} "
              f"{'95% interval':>19} {'rounds':>6} {'error':>8} {'naive sum':>10} "
              f"{'naive err':>10} {'of original':>11} {'ratio err':>9}\n")
    for i, r in enumerate(report.rows):
        interval = f"[{r.measured_low_ms:.4f}, {r.measured_high_ms:.4f}]"
        flag = "" if r.tight else " (not tight)"
        out.write(f"{i:>7} {r.estimated_ms:>13.4f} {r.measured_ms:>12.4f} {interval:>19} "
                  f"{r.rounds:>6} {r.rel_error:>+8.1%} {r.naive_ms:>10.4f} "
                  f"{r.naive_rel_error:>+10.1%} {r.measured_ratio:>11.3f} "
                  f"{r.ratio_rel_error:>+9.1%}{flag}\n")
    out.write(
        f"{network.name}: median |error| {report.median_abs_rel_error:.1%}, "
        f"max {report.max_abs_rel_error:.1%} over {len(report.rows)} variants "
        f"(naive sum: {report.naive_median_abs_rel_error:.1%} / "
        f"{report.naive_max_abs_rel_error:.1%}); as a fraction of the unpruned network "
        f"measured in the same rounds: median |error| {report.median_abs_ratio_error:.1%}, max "
        f"{report.max_abs_ratio_error:.1%}; correction fitted on "
        f"{report.calibration_samples} whole networks; {report.keys_fetched} keys measured "
        f"on demand, {report.keys_revisited} of them again in a late pass ({report.keys_faster} "
        f"faster by more than {LATE_PASS_REPORTED:.0%}; before it: median |error| "
        f"{report.first_median_abs_rel_error:.1%}, max {report.first_max_abs_rel_error:.1%}); "
        f"table {lut_path}\n")
    return 0


def _info(args: argparse.Namespace, out: TextIO) -> int:
    with LutStore.open(args.lut_file, create=False) as store:
        est = LatencyEstimator.from_store(store) if store.count("overhead") else None
        data = {
            "lut": str(store.path),
            "identity": store.identity.to_dict(),
            "schema_version": store.schema_version,
            "rows": store.kinds(),
            "overhead_ms": est.overhead_ms if est else None,
            "correction": None if est is None else {
                "c_sum": est.correction.c_sum, "c_units": est.correction.c_units,
                "c_weights_ms_per_mb": est.correction.c_weights,
                "samples": est.correction.samples},
        }
    if args.json:
        out.write(json.dumps(data, indent=2) + "\n")
    else:
        for k, v in data.items():
            out.write(f"{k}: {v}\n")
    return 0


def _export(args: argparse.Namespace, out: TextIO) -> int:
    with LutStore.open(args.lut_file, create=False) as store:
        if args.output.endswith(".csv"):
            n = export_csv(store, args.output)
        elif args.output.endswith(".json"):
            n = export_json(store, args.output)
        else:
            raise CommandError(f"export to .csv or .json, not {args.output}")
    out.write(f"wrote {n} rows to {args.output}\n")
    return 0


def _import(args: argparse.Namespace, out: TextIO) -> int:
    with LutStore.open(args.lut_file, create=False) as store:
        report = import_file(args.input, store, allow_mismatch=args.allow_mismatch)
    out.write(report.describe() + "\n")
    return 0

