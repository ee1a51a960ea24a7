"""`make bench-protocol`: which statistic of a whole-network measurement repeats, quiet and
beside a noisy neighbour, and does re-creating the session change it?

For four networks (MobileNetV1 and MobileNetV2 at 1x28x28, full and one pruned variant each),
`--repeats` back-to-back calls of each policy (interleaved), and from every call's samples the
minimum, 10th and 25th percentiles, median and 10%-trimmed mean. Reported: the coefficient of
variation of each statistic over the calls (lower = repeats better), per network and policy.
"session" repeats the new policy on copies of the model that differ only in their doc string,
so every call builds a new ONNX Runtime session. Then the whole-network protocol
(host/device/whole_model.py) twice per condition: how far its figures moved between the two runs.

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

import numpy as np
import onnx

from device_server.spec import MeasurePolicy, SessionSpec
from host.device.local_daemon import start_local_daemon
from host.device.noisy_neighbour import NoisyNeighbour
from host.device.whole_model import WHOLE_MODEL_POLICY, measure_networks
from host.network import load_network, random_config

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


def run_condition(client, nets: dict[str, bytes], repeats: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench-results/protocol.json"))
    args = parser.parse_args(argv)
    nets: dict[str, bytes] = {}
    for name in ("mobilenet_v1", "mobilenet_v2"):
        net = load_network(name, (1, 1, 28, 28))
        nets[name] = net.onnx()
        nets[f"{name} pruned"] = net.onnx(random_config(net.groups, random.Random(3)))
    results: dict[str, object] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with start_local_daemon(threads=1) as daemon:
        client = daemon.client()
        for cond in ("quiet", "noisy neighbour"):
            ctx = (NoisyNeighbour(seed=1, duty=0.5, seconds=1800) if cond != "quiet"
                   else contextlib.nullcontext())
            with ctx:
                results[cond] = run_condition(client, nets, args.repeats)
            print(f"== {cond}", flush=True)
            cv = results[cond]["cv"]  # type: ignore[index]
            print(f"{'network / policy':<42}" + "".join(f"{s:>13}" for s in STATS))
            for row, vals in cv.items():
                print(f"{row:<42}" + "".join(f"{100 * vals[s]:>12.1f}%" for s in STATS))
            print("protocol, move between two runs: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in
                results[cond]["protocol_move_between_runs"].items()), flush=True)  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
