"""`make bench-adapt`: NetAdapt on the built-in MNIST task, against what an indirect metric and
uniform width multipliers reach at the same latency budgets.

Network: MobileNetV1 (width 0.5, first conv at stride 1, 1x28x28) trained 5 epochs with Adam on
the 3,500-image train split; 500 holdout images select proposals; 1,000 test images are only
used for the figures below. ORT CPU provider, one thread, through a loopback daemon.

For each budget (fraction of the original's measured latency):
  * NetAdapt driven by the latency lookup table (on-demand, calibrated),
  * the same engine driven by MACs (proposals sized by MACs; stopping still by latency),
  * uniform width: every group cut by the same fraction (largest that meets the budget by
    the table's estimate), from the same base, BN re-estimated and fine-tuned for as many
    steps as the NetAdapt run spent fine-tuning in total (equal training).
Every final network and the original are then measured in one interleaved pass (5 rounds), so
drift of this shared machine hits them alike. Reported: test accuracy, measured latency and
speedup, estimate vs measured, and where NetAdapt's time went.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from device_server.spec import SessionSpec
from host.daemon import start_local_daemon
from host.data import load_dataset
from host.engine.config import AdaptConfig, Budget
from host.engine.netadapt import NetAdapt
from host.graph.onnx_export import export_onnx
from host.graph.surgery import uniform_width_config
from host.lut_validation import calibrate, on_demand
from host.network import analyse
from host.pool import DevicePool
from host.training import TrainConfig, evaluate, fine_tune, pretrained_base, recalibrate_batchnorm
from host.whole_model import measure_networks
from lut.builder import ensure_overhead, identity_for
from lut.calibration import architecture_of
from lut.estimator import LatencyEstimator
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.75, 0.5, 0.35])
    parser.add_argument("--metrics", nargs="*", default=["latency", "macs"])
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short-term-steps", type=int, default=10)
    parser.add_argument("--initial-reduction", type=float, default=0.05)
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/adapt"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/adapt.json"))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    splits = load_dataset("mnist_5k", seed=0)
    base = pretrained_base("mobilenet_v1", "mnist_5k", args.workdir / "cache",
                           TrainConfig(epochs=5, lr=2e-3, seed=args.seed), splits=splits,
                           progress=False, width_mult=args.width)
    results: dict[str, object] = {"base_holdout": base.holdout_accuracy}
    finals: dict[str, object] = {}
    with start_local_daemon(threads=1) as daemon, DevicePool([daemon.client()]) as pool:
        network = analyse("mobilenet_v1", base.model, (1, *splits.input_shape))
        with LutStore.open(args.workdir / "lut.sqlite", identity_for(pool.info, SESSION)) as store:
            ensure_overhead(store, pool, SESSION)
            calibrate(store, pool, network, SESSION, 10, args.seed)
            est = LatencyEstimator.from_store(store, fetch=on_demand(store, pool, SESSION),
                                              architecture=architecture_of(network.specs()))
            for budget in args.budgets:
                for metric in args.metrics:
                    name = f"netadapt-{metric}@{budget}"
                    config = AdaptConfig(Budget(fraction=budget), metric=metric,
                                         initial_reduction=args.initial_reduction,
                                         short_term_steps=args.short_term_steps, bn_batches=10,
                                         long_term_epochs=1, seed=args.seed)
                    engine = NetAdapt(network, splits, est, pool, SESSION, config,
                                      args.workdir / name.replace("@", "_"), progress=False)
                    shutil.rmtree(engine.workdir, ignore_errors=True)
                    t0 = time.monotonic()
                    res = engine.run()
                    finals[name] = {
                        "model": engine.final_model, "config": engine.final_config,
                        "estimated_ms": res.estimated_latency_ms,
                        "test_accuracy": res.final_accuracy, "iterations": res.iterations,
                        "budget_ms": res.budget_ms, "seconds": time.monotonic() - t0,
                        "timings_s": dict(engine.timings),
                        "finetune_steps": args.short_term_steps * res.iterations,
                        "proposals": sum(len(r.proposals) for r in res.history),
                    }
                    print(name, {k: v for k, v in finals[name].items()  # type: ignore[union-attr]
                                 if k not in ("model", "config")}, flush=True)
                # Uniform width at the same budget, with as much fine-tuning as NetAdapt's
                # selected path got (its short-term steps per iteration plus the long epoch).
                target = finals[f"netadapt-{args.metrics[0]}@{budget}"]["budget_ms"]  # type: ignore[index]
                steps = finals[f"netadapt-{args.metrics[0]}@{budget}"]["finetune_steps"]  # type: ignore[index]
                for frac in [x / 100 for x in range(100, 4, -5)]:
                    cfg = uniform_width_config(network.groups, frac, round_to=8)
                    if est.estimate(network.specs(cfg)) <= target:
                        break
                model = network.pruned(cfg)
                recalibrate_batchnorm(model, splits.train, num_batches=10, seed=args.seed)
                per_epoch = len(splits.train) // 64
                fine_tune(model, splits.train, steps + per_epoch,
                          TrainConfig(lr=1e-3, seed=args.seed))
                finals[f"uniform@{budget}"] = {
                    "model": model, "config": cfg, "fraction": frac,
                    "estimated_ms": est.estimate(network.specs(cfg)),
                    "test_accuracy": evaluate(model, splits.test),
                }
            names = ["original", *finals]
            models = [network.model] + [f["model"] for f in finals.values()]  # type: ignore[index]
            blobs = [export_onnx(m, network.input_shape) for m in models]
            timings = measure_networks(pool.clients[0], blobs, SESSION, passes=5)
    original_ms = timings[0].median_ms
    rows = {"original": {"test_accuracy": evaluate(network.model, splits.test),
                         "measured_ms": original_ms,
                         "estimated_ms": est.estimate(network.specs())}}
    for name, timing in zip(names[1:], timings[1:], strict=True):
        f = {k: v for k, v in finals[name].items() if k not in ("model", "config")}  # type: ignore[union-attr]
        f["measured_ms"] = timing.median_ms
        f["speedup"] = original_ms / timing.median_ms
        f["estimate_error"] = (f["estimated_ms"] - timing.median_ms) / timing.median_ms
        rows[name] = f
    results["rows"] = rows
    results["conditions"] = dataclasses.asdict(SESSION) | {"width": args.width,
                                                           "seed": args.seed}
    for name, row in rows.items():
        print(f"{name:<26} test {row['test_accuracy']:.4f}  measured "
              f"{row['measured_ms']:.4f} ms  est {row['estimated_ms']:.4f} ms"
              + (f"  speedup {row['speedup']:.2f}x" if "speedup" in row else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
