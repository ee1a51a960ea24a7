"""`make bench-protocol`: which statistic of a whole-network measurement repeats, quiet and
beside a noisy neighbour, and does re-creating the session change it?

For four networks (MobileNetV1 and MobileNetV2 at 1x28x28, full and one pruned variant each),
`--repeats` back-to-back calls of each policy (interleaved), and from every call's samples the
minimum, 10th and 25th percentiles, median and 10%-trimmed mean. Reported: the coefficient of
variation of each statistic over the calls (lower = repeats better), per network and policy.
"session" repeats the new policy on copies of the model that differ only in their doc string,
so every call builds a new ONNX Runtime session. Then the whole-network protocol
(host/device/whole_model.py) twice per condition: how far its figures moved between the two runs.

`--part ratio`: how a ratio of two networks (the budget check's figure) holds up. `make run`'s
network and a variant pruned to about half are measured in `--passes` interleaved passes per
condition; then windows of those passes are replayed through two estimators as a budget check
uses them (from 6 passes, one more until the interval is within +-1.5%, at most 48): the
median of per-pass ratios (until 2026-12) and the ratio of the two networks' figures (their
10th percentile over passes, now). Reference: the ratio of the two networks' fastest passes
over every pass of every condition. Reported per estimator: |error| against the reference, the
passes taken, the share of windows tight, and of tight ones that missed the reference by more
than 0.5% beyond their interval (tight and wrong).

Policies: "old" (before the robust protocol: 20 samples of >= 5 ms, statistic: median) and
"new" (60 samples of >= 1 ms, preempted samples taken again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import median_interval
from host.device.client import DeviceClient
from host.device.local_daemon import start_local_daemon
from host.device.noisy_neighbour import NoisyNeighbour
from host.device.whole_model import (
    WHOLE_MODEL_POLICY,
    Figure,
    Rounds,
    WholeModelProtocol,
    measure_networks,
)
from host.models.mobilenet_v1 import MobileNetV1
from host.network import analyse, load_network, random_config

OLD = MeasurePolicy(warmup_runs=10, min_warmup_ms=50, repeat=20, min_repeat_ms=5)
STATS = ("min", "p10", "p25", "median", "trimmed_mean")


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.sort(np.asarray(samples))
    k = len(a) // 10
    return {"min": float(a[0]), "p10": float(np.quantile(a, 0.1)),
            "p25": float(np.quantile(a, 0.25)), "median": float(np.median(a)),
            "trimmed_mean": float(a[k:len(a) - k].mean() if len(a) > 2 * k else a.mean())}


def _cv(values: list[float]) -> float:
    v = np.asarray(values)
    return float(v.std() / v.mean())


def _relabelled(blob: bytes, i: int) -> bytes:
    model = onnx.load_from_string(blob)
    model.doc_string = f"copy {i}"
    return model.SerializeToString()


def run_condition(client: DeviceClient, nets: dict[str, bytes], repeats: int
                  ) -> dict[str, object]:
    session = SessionSpec(intra_op_threads=1)
    shas = {name: client.upload_model(b) for name, b in nets.items()}
    calls: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(repeats):
        for name, blob in nets.items():
            for policy_name, policy, sha in (
                ("old", OLD, shas[name]),
                ("new", WHOLE_MODEL_POLICY, shas[name]),
                ("new, new session", WHOLE_MODEL_POLICY,
                 client.upload_model(_relabelled(blob, r))),
            ):
                t = client.measure_model(sha, session, policy).timing
                calls.setdefault((name, policy_name), []).append(_stats(list(t.samples_ms)))
    table = {f"{name} / {policy}": {s: _cv([c[s] for c in cs]) for s in STATS}
             for (name, policy), cs in calls.items()}
    blobs = list(nets.values())
    runs = [measure_networks(client, blobs, session) for _ in range(2)]
    moves = {name: abs(runs[1].figure(i).value / runs[0].figure(i).value - 1)
             for i, name in enumerate(nets)}
    halfwidths = {name: max(r.figure(i).rel_halfwidth for r in runs)
                  for i, name in enumerate(nets)}
    return {"cv": table, "protocol_move_between_runs": moves,
            "protocol_max_halfwidth": halfwidths,
            "protocol_seconds": [r.seconds for r in runs]}


def _median_of_ratios(rounds: Rounds) -> Figure:
    """The ratio before 2026-12: the median of per-pass ratios, with its median's interval."""
    ratios = [c / o for o, c in zip(rounds.values[0], rounds.values[1], strict=True)]
    low, high = median_interval(ratios)
    value = float(np.median(ratios))
    return Figure(value, low, high, len(ratios),
                  (high - low) / 2 <= rounds.target_halfwidth * value)


ESTIMATORS = {"median of per-pass ratios": _median_of_ratios,
              "ratio of figures": lambda r: r.ratio(1, 0)}


def replay(values: list[list[float]], reference: float) -> dict[str, dict[str, float]]:
    """Windows of the passes (one starting every 6) through each estimator, as a check would
    take them: from 6 passes, one more until tight, at most 48."""
    out = {}
    for name, estimator in ESTIMATORS.items():
        errors, passes, tight, wrong = [], [], [], []
        for start in range(0, len(values[0]) - 48 + 1, 6):
            for n in range(6, 49):
                fig = estimator(Rounds([v[start:start + n] for v in values], 0.015))
                if fig.tight:
                    break
            errors.append(abs(fig.value / reference - 1))
            passes.append(n)
            tight.append(fig.tight)
            wrong.append(fig.tight and not fig.low * 0.995 <= reference <= fig.high * 1.005)
        out[name] = {"median_abs_error": float(np.median(errors)),
                     "max_abs_error": float(max(errors)),
                     "median_passes": float(np.median(passes)),
                     "tight_share": float(np.mean(tight)),
                     "tight_and_wrong_share": float(np.mean(wrong)),
                     "windows": len(errors)}
    return out


def run_ratio_part(client: DeviceClient, passes: int) -> dict[str, object]:
    torch.manual_seed(0)
    net = analyse("mobilenet_v1", MobileNetV1(width_mult=0.5), (1, 1, 28, 28))
    blobs = [net.onnx(), net.onnx(random_config(net.groups, random.Random(3), keep=0.6))]
    protocol = WholeModelProtocol(max_rounds=passes, decision_rounds=passes, max_seconds=1e9)
    values = {}
    for cond in ("quiet", "noisy neighbour"):
        ctx = (NoisyNeighbour(seed=4, duty=0.5, seconds=1800) if cond != "quiet"
               else contextlib.nullcontext())
        with ctx:
            values[cond] = measure_networks(client, blobs, SessionSpec(intra_op_threads=1),
                                            protocol, settled=lambda r: False).values
    fastest = [min(min(v[i]) for v in values.values()) for i in range(2)]
    reference = fastest[1] / fastest[0]
    results: dict[str, object] = {"reference": reference, "passes_ms": values}
    for cond, v in values.items():
        results[cond] = replay(v, reference)
        print(f"== ratio, {cond} ({passes} passes; reference {reference:.4f})", flush=True)
        for name, row in results[cond].items():  # type: ignore[attr-defined]
            print(f"{name:<28} |error| median {100 * row['median_abs_error']:.1f}% max "
                  f"{100 * row['max_abs_error']:.1f}%, passes median {row['median_passes']:.0f}, "
                  f"tight {100 * row['tight_share']:.0f}%, tight and wrong "
                  f"{100 * row['tight_and_wrong_share']:.0f}% of {row['windows']} windows",
                  flush=True)
    return results


def run_statistics_part(client: DeviceClient, repeats: int, results: dict[str, object]) -> None:
    """Each statistic's spread over `repeats` measurements of four networks, quiet and beside
    the noisy neighbour; adds one entry per condition to `results` and prints the table."""
    nets: dict[str, bytes] = {}
    for name in ("mobilenet_v1", "mobilenet_v2"):
        net = load_network(name, (1, 1, 28, 28))
        nets[name] = net.onnx()
        nets[f"{name} pruned"] = net.onnx(random_config(net.groups, random.Random(3)))
    for cond in ("quiet", "noisy neighbour"):
        ctx = (NoisyNeighbour(seed=1, duty=0.5, seconds=1800) if cond != "quiet"
               else contextlib.nullcontext())
        with ctx:
            measured: dict[str, Any] = run_condition(client, nets, repeats)
        results[cond] = measured
        print(f"== {cond}", flush=True)
        print(f"{'network / policy':<42}" + "".join(f"{s:>13}" for s in STATS))
        for row, vals in measured["cv"].items():
            print(f"{row:<42}" + "".join(f"{100 * vals[s]:>12.1f}%" for s in STATS))
        print("protocol, move between two runs: " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in measured["protocol_move_between_runs"].items()),
            flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench-results/protocol.json"))
    parser.add_argument("--part", choices=("all", "statistics", "ratio"), default="all")
    parser.add_argument("--passes", type=int, default=150, help="per condition, --part ratio")
    args = parser.parse_args(argv)
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with start_local_daemon(threads=1) as daemon:
        client = daemon.client()
        if args.part in ("all", "ratio"):
            results["ratio"] = run_ratio_part(client, args.passes)
        if args.part in ("all", "statistics"):
            run_statistics_part(client, args.repeats, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
