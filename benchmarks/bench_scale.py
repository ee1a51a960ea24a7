"""`make bench-scale`: what scaling out buys, measured on this machine.

1. Executors: one NetAdapt iteration of MobileNetV1 (width 0.5, MNIST 1x28x28, the `make run`
   base model) — one proposal per layer group, each pruned, BN re-estimated, fine-tuned
   (`--short-term-steps`) and scored on the holdout split — run by the sequential executor,
   the local pool (`--workers`) and Ray (a local Ray with as many CPUs, started once and
   timed apart). Proposals are sized by MACs so that no daemon competes for the cores. Reports
   wall time per executor (median of `--repeats`), whether their results are identical, the
   per-task cost, and the projected wall time of the iteration on N workers:
   driver time + ceil(P / N) x median task time + Ray's measured per-wave overhead.
2. Devices: the same shuffled LUT keys of MobileNetV1 built into fresh tables by one daemon
   pinned to CPU 0, and by a pool of two daemons pinned to CPUs 0 and 1. Reports keys/s in all
   and per device, and the ratio. On a 2-core machine the host's own work shares those cores.

Every number is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from device_server.spec import SessionSpec
from host.data import load_dataset
from host.device.local_daemon import start_local_daemon
from host.device.pool import DevicePool
from host.device.table_builder import DriftGuard, build_table, identity_for
from host.engine.executor import Executor, LocalPoolExecutor, SequentialExecutor
from host.engine.metrics import make_metric
from host.engine.proposals import ProposalContext, ProposalResult, choose_proposals
from host.engine.ray_executor import RayExecutor, import_ray
from host.network import analyse, load_network
from host.training import TrainConfig, pretrained_base
from lut.keys import plan_keys, shuffled
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)


def _time_executor(make: Callable[[], Executor], model: torch.nn.Module, proposals: list[Any],
                   repeats: int) -> tuple[list[float], list[ProposalResult], float]:
    t0 = time.perf_counter()
    executor = make()
    start_s = time.perf_counter() - t0
    walls, results = [], []
    try:
        for _ in range(repeats):
            t1 = time.perf_counter()
            results = executor.run(model, proposals, 0)
            walls.append(time.perf_counter() - t1)
    finally:
        executor.close()
    return walls, results, start_s


def bench_executors(args: argparse.Namespace) -> dict[str, Any]:
    splits = load_dataset("mnist_5k", seed=0)
    base = pretrained_base("mobilenet_v1", "mnist_5k", args.workdir / "cache",
                           TrainConfig(epochs=3, lr=2e-3, seed=0), splits=splits,
                           progress=False, width_mult=0.5)
    network = analyse("mobilenet_v1", base.model, (1, *splits.input_shape))
    macs = make_metric("macs", None)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    full = network.full_config()
    proposals = choose_proposals(network.groups, full, network.specs, macs,
                                 0.05 * macs(network.specs(full)), 8)
    driver_s = time.perf_counter() - t0
    ctx = ProposalContext(splits.train, splits.holdout, network.input_shape, "l2",
                          args.short_term_steps, 10, TrainConfig(epochs=1, lr=1e-3, seed=0), 0)
    print(f"{len(proposals)} proposals, {args.short_term_steps} short-term steps each",
          flush=True)
    runs: dict[str, Any] = {}
    makers: dict[str, Callable[[], Executor]] = {
        "sequential": lambda: SequentialExecutor(ctx),
        f"local_pool_{args.workers}": lambda: LocalPoolExecutor(ctx, args.workers),
    }
    try:
        ray = import_ray()
        temp = tempfile.mkdtemp(prefix="ray-")

        def make_ray() -> Executor:
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                     _temp_dir=temp, configure_logging=False)
            return RayExecutor(ctx)

        makers[f"ray_{args.workers}_cpus"] = make_ray
    except ImportError as exc:
        print(f"skipping Ray: {exc}", flush=True)
    reference: list[ProposalResult] | None = None
    for name, make in makers.items():
        walls, results, start_s = _time_executor(make, base.model, proposals, args.repeats)
        if name.startswith("ray"):
            ray.shutdown()
        if reference is None:
            reference = results
        same = [r.holdout_accuracy for r in results] == \
            [r.holdout_accuracy for r in reference] and all(
                all(torch.equal(a, b) for a, b in zip(x.model.state_dict().values(),
                                                       y.model.state_dict().values(), strict=True))
                for x, y in zip(results, reference, strict=True))
        tasks = [r.surgery_s + r.finetune_s + r.eval_s for r in results]
        runs[name] = {"wall_s": [round(w, 2) for w in walls],
                      "median_wall_s": round(statistics.median(walls), 2),
                      "startup_s": round(start_s, 2), "identical_to_sequential": same,
                      "median_task_s": round(statistics.median(tasks), 3)}
        print(name, runs[name], flush=True)
    seq = runs["sequential"]
    task_s = seq["median_task_s"]
    p = len(proposals)
    out: dict[str, Any] = {"proposals": p, "short_term_steps": args.short_term_steps,
                           "driver_s": round(driver_s, 3), "executors": runs}
    for name, r in runs.items():
        if name != "sequential":
            r["speedup_vs_sequential"] = round(seq["median_wall_s"] / r["median_wall_s"], 2)
    ray_runs = [r for n, r in runs.items() if n.startswith("ray")]
    # Ray's cost beyond the tasks themselves, per wave of `workers` tasks, from this run.
    waves = math.ceil(p / args.workers)
    overhead = max(0.0, (ray_runs[0]["median_wall_s"] - waves * ray_runs[0]["median_task_s"])
                   / waves) if ray_runs else 0.0
    out["ray_overhead_per_wave_s"] = round(overhead, 3)
    out["projected_iteration_s"] = {
        str(n): round(driver_s + math.ceil(p / n) * (task_s + overhead), 1)
        for n in sorted({1, 2, 4, 8, 16, p})}
    return out


def bench_devices(args: argparse.Namespace) -> dict[str, Any]:
    net = load_network("mobilenet_v1", (1, 1, 28, 28), 10)
    specs = shuffled(plan_keys(net.planner, step=8).specs, 1)[:args.keys]
    guard = DriftGuard(threshold=float("inf"))
    out: dict[str, Any] = {"keys": len(specs), "cpus_here": os.cpu_count()}
    for name, cpus in (("one_daemon_cpu0", [[0]]), ("two_daemons_cpu0_cpu1", [[0], [1]])):
        daemons = [start_local_daemon(threads=1, cpus=c) for c in cpus]
        try:
            with DevicePool([d.client() for d in daemons]) as pool, \
                    tempfile.TemporaryDirectory() as tmp, \
                    LutStore.open(Path(tmp) / "t.sqlite", identity_for(pool.info, SESSION)) as st:
                t0 = time.monotonic()
                report = build_table(st, pool, specs, SESSION, drift=guard, progress=False)
                wall = time.monotonic() - t0
        finally:
            for d in daemons:
                d.stop()
        out[name] = {"seconds": round(wall, 1), "keys_per_s": round(report.measured / wall, 1),
                     "requeued": report.requeued,
                     "devices": [{"cpus": c, "measured": d.measured,
                                  "keys_per_s_busy": round(d.per_second, 1)}
                                 for c, d in zip(cpus, report.devices, strict=True)]}
        print(name, out[name], flush=True)
    out["ratio_two_vs_one"] = round(out["two_daemons_cpu0_cpu1"]["keys_per_s"]
                                    / out["one_daemon_cpu0"]["keys_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short-term-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keys", type=int, default=600, help="LUT keys for the device part")
    parser.add_argument("--skip", choices=("executors", "devices"))
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/scale"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/scale.json"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    if args.skip != "devices":
        results["devices"] = bench_devices(args)
    if args.skip != "executors":
        results["executors"] = bench_executors(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
