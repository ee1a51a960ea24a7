"""`make bench-device`: does the daemon measure what ONNX Runtime measures in-process, and what
does going through gRPC cost?

For ~50 distinct fusion units of MobileNetV2 (224x224, ImageNet head, widths 1.0 and 0.75),
each unit is timed through a loopback daemon (its own process, `netadapt-device serve`) and in
this process with the daemon's own timer, in alternating order per unit and over two passes,
so drift on this shared machine hits both paths alike. Reported: per-unit median ratio
(gRPC / in-process), the share of units above 0.1 ms that agree within 3%, and the wall time
of each path (session creation + warm-up + repeats; the gRPC path also pays serialisation
and transport).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from device_server.builder import build_layer_model
from device_server.spec import LayerSpec, MeasurePolicy, SessionSpec
from device_server.timer import TimeBudget, create_session, time_callable
from host.device.client import DeviceClient
from host.device.local_daemon import start_local_daemon
from host.graph.units import extract_units, unit_specs
from host.models.registry import build_model

POLICY = MeasurePolicy(warmup_runs=10, min_warmup_ms=50, repeat=20, min_repeat_ms=5)
SESSION = SessionSpec(intra_op_threads=1)


def mobilenet_v2_units(limit: int) -> list[LayerSpec]:
    """Distinct units of MobileNetV2 at 224x224, widths 1.0 then 0.75 (one width has only
    32 distinct units: its blocks repeat)."""
    specs: list[LayerSpec] = []
    for width in (1.0, 0.75):
        model = build_model("mobilenet_v2", num_classes=1000, in_channels=3, input_size=224,
                            width_mult=width)
        specs += unit_specs(extract_units(model, (1, 3, 224, 224)))
    return list(dict.fromkeys(specs))[:limit]


def in_process(spec: LayerSpec) -> tuple[float, float]:
    """(median ms, wall s) with a fresh session, as the daemon's first measurement of a key."""
    t0 = time.perf_counter()
    prepared = create_session(build_layer_model(spec).SerializeToString(), SESSION)
    timing = time_callable(prepared.run, POLICY, TimeBudget(cap_s=600))
    return timing.median_ms, time.perf_counter() - t0


def over_grpc(client: DeviceClient, spec: LayerSpec) -> tuple[float, float]:
    t0 = time.perf_counter()
    m = client.measure(spec, SESSION, POLICY)
    return m.timing.median_ms, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=50)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    specs = mobilenet_v2_units(args.units)
    remote: dict[str, list[float]] = {s.key(): [] for s in specs}
    local: dict[str, list[float]] = {s.key(): [] for s in specs}
    wall = {"grpc_s": 0.0, "in_process_s": 0.0}
    with start_local_daemon(threads=1) as daemon, daemon.client() as client:
        info = client.device_info()
        for p in range(args.passes):
            for i, spec in enumerate(specs):
                # Alternate which path goes first, so neither always runs on a warmer cache.
                order = (0, 1) if (i + p) % 2 == 0 else (1, 0)
                for which in order:
                    if which == 0:
                        med, secs = over_grpc(client, spec)
                        remote[spec.key()].append(med)
                        wall["grpc_s"] += secs
                    else:
                        med, secs = in_process(spec)
                        local[spec.key()].append(med)
                        wall["in_process_s"] += secs
                print(f"\rpass {p + 1}/{args.passes} unit {i + 1}/{len(specs)}", end="",
                      file=sys.stderr)
        print(file=sys.stderr)

    rows = []
    for spec in specs:
        r, l_ = statistics.median(remote[spec.key()]), statistics.median(local[spec.key()])
        rows.append({"unit": spec.describe(), "grpc_median_ms": r, "in_process_median_ms": l_,
                     "ratio": r / l_})
    big = [row for row in rows if row["in_process_median_ms"] > 0.1]
    devs = [abs(row["ratio"] - 1) for row in big]
    summary = {
        "device": f"{info.cpu_model} x{info.cpu_count}, ORT {info.ort_version}, 1 thread",
        "units": len(rows),
        "units_above_0.1ms": len(big),
        "median_abs_ratio_dev_above_0.1ms": statistics.median(devs) if devs else None,
        "share_within_3pct_above_0.1ms": sum(d <= 0.03 for d in devs) / len(devs) if devs else None,
        "max_abs_ratio_dev_above_0.1ms": max(devs) if devs else None,
        "wall_grpc_s": wall["grpc_s"],
        "wall_in_process_s": wall["in_process_s"],
        "wall_overhead": wall["grpc_s"] / wall["in_process_s"] - 1,
        "policy": {"warmup_runs": POLICY.warmup_runs, "min_warmup_ms": POLICY.min_warmup_ms,
                   "repeat": POLICY.repeat, "min_repeat_ms": POLICY.min_repeat_ms},
        "passes": args.passes,
    }
    for row in rows:
        print(f"{row['unit']:<40} grpc {row['grpc_median_ms']:8.4f} ms  "
              f"in-process {row['in_process_median_ms']:8.4f} ms  ratio {row['ratio']:.3f}")
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
