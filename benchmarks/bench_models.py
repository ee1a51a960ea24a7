"""`make bench-models`: torchvision's classification models through the whole product.

For each of mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, efficientnet_b0, resnet18,
resnet50, squeezenet1_1, shufflenet_v2_x1_0, mnasnet1_0, regnet_y_400mf, densenet121 and
googlenet, with random weights (seed 0; no weights are downloaded), 10 classes, at their usual
input size 1x3x224x224:

1. analysis (host.network.analyse): fusion units, NODE units by ONNX op, prunable groups found,
   groups kept whole (with their reasons), seconds;
2. `lut validate` (host.lut_validation.validate) from an empty on-demand table: the correction
   fitted on `--calibrate` whole networks, then `--variants` random pruned variants estimated
   from the table and measured whole on the daemon (the robust protocol of
   host/device/whole_model.py
   with `--min-rounds`/`--max-rounds`/`--max-seconds` per call, `--repeat` samples a round);
   median and max |error|;
3. a `--iterations`-iteration NetAdapt run (the real engine) towards `--budget` of the measured
   latency, on 64/32/32 digits upsampled to 3x224x224 (accuracy figures mean nothing here:
   random weights, tiny data; the run shows the engine measures, estimates, prunes and
   fine-tunes the network), `--short-term-steps` steps of batch `--batch-size` per proposal,
   `--workers` processes; the final network measured against the original in the same rounds.

One loopback daemon, one ORT thread. Sized for 2 shared cores: the assumption behind every
figure is written next to it in the JSON (`settings`). Run twice; the README quotes both.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import fcntl
import json
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from device_server.spec import OpKind, SessionSpec
from host.data import DataSplits, load_sklearn_digits
from host.device.local_daemon import start_local_daemon
from host.device.pool import DevicePool
from host.device.table_builder import identity_for
from host.device.whole_model import WHOLE_MODEL_POLICY, WholeModelProtocol
from host.engine.config import AdaptConfig, Budget
from host.engine.netadapt import NetAdapt
from host.lut_validation import on_demand, validate
from host.models.registry import build_model_for
from host.network import analyse
from lut.calibration import architecture_of
from lut.estimator import LatencyEstimator
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)
MODELS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "resnet18", "resnet50", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0",
          "regnet_y_400mf", "densenet121", "googlenet"]
SHAPE = (1, 3, 224, 224)
CLASSES = 10

log = logging.getLogger("bench_models")


def digits_224(n_train: int, n_holdout: int, n_test: int, size: int = 224) -> DataSplits:
    """scikit-learn's 8x8 digits upsampled to 3 x size x size (bilinear, the grey channel
    repeated), first n_train / n_holdout / n_test images of a fixed shuffle, normalised."""
    digits = load_sklearn_digits()
    n = n_train + n_holdout + n_test
    order = torch.randperm(len(digits.labels), generator=torch.Generator().manual_seed(0))[:n]
    images = digits.images[order].float()  # (n, 1, 8, 8)
    labels = digits.labels[order].long()
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)  # (n, 3, size, size)
    images = (images - images.mean()) / images.std()
    parts = [TensorDataset(images[a:b], labels[a:b]) for a, b in
             ((0, n_train), (n_train, n_train + n_holdout), (n_train + n_holdout, n))]
    return DataSplits(parts[0], parts[1], parts[2], 10, (3, size, size))


def _analysis(name: str) -> tuple[Any, dict[str, Any]]:
    torch.manual_seed(0)
    model = build_model_for(f"torchvision:{name}", SHAPE[1:], CLASSES)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    network = analyse(name, model, SHAPE)
    seconds = time.perf_counter() - t0
    nodes = collections.Counter(u.core.node_op for u in network.units
                                if u.core.op is OpKind.NODE)
    return network, {
        "units": len(network.units),
        "node_units": dict(sorted(nodes.items())),
        "groups": len(network.groups),
        "kept": len(network.kept),
        "kept_with_warning": [k.describe() for k in network.kept if not k.expected],
        "analysis_s": round(seconds, 2),
    }


def _adapt(network: Any, store: LutStore, pool: DevicePool, splits: DataSplits,
           protocol: WholeModelProtocol, args: argparse.Namespace, workdir: Path
           ) -> dict[str, Any]:
    estimator = LatencyEstimator.from_store(store, fetch=on_demand(store, pool, SESSION),
                                            architecture=architecture_of(network.specs()))
    config = AdaptConfig(budget=Budget(fraction=args.budget), initial_reduction=0.05,
                         short_term_steps=args.short_term_steps, bn_batches=1,
                         long_term_epochs=0, batch_size=args.batch_size,
                         max_iterations=args.iterations, workers=args.workers, seed=0)
    engine = NetAdapt(network, splits, estimator, pool, SESSION, config, workdir,
                      progress=False, protocol=protocol)
    t0 = time.perf_counter()
    result = engine.run()
    ratio = result.final_ratio
    return {
        "iterations": result.iterations,
        "original_ms": round(result.original_latency_final_pass_ms, 3),
        "final_ms": round(result.final_latency_ms, 3),
        "measured_ratio": round(ratio.value, 4) if ratio is not None else None,
        "measured_ratio_interval": ([round(ratio.low, 4), round(ratio.high, 4)]
                                    if ratio is not None else None),
        "speedup": round(result.speedup, 3),
        "estimated_ms": round(result.estimated_latency_ms, 3),
        "budget_fraction": args.budget,
        "budget_met": result.budget_met,
        "pruned_groups": [h.group_root for h in result.history],
        "keys_fetched_on_demand": estimator.fetched,
        "seconds": round(time.perf_counter() - t0, 1),
        "engine_timings_s": {k: round(v, 1) for k, v in engine.timings.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--variants", type=int, default=8)
    parser.add_argument("--calibrate", type=int, default=5)
    # 6 rounds are the fewest whose figure can be tight (host/device/whole_model.py); fewer
    # leave every calibration sample too wide to fit on.
    parser.add_argument("--min-rounds", type=int, default=6)
    parser.add_argument("--max-rounds", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=20,
                        help="samples per round (the 28x28 default of 60 costs minutes at 224)")
    parser.add_argument("--max-seconds", type=float, default=120.0,
                        help="cap on one whole-network measurement call (all its networks)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.9)
    parser.add_argument("--short-term-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-adapt", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/models"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/models.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Each model's table is deleted and rebuilt from empty: a second run on the same workdir
    # would unlink a table under the first one's open connection (seen: a LutCorruptError).
    lock = (args.workdir / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"bench_models: another run is using {args.workdir}; give --workdir another folder",
              file=sys.stderr)
        return 2
    policy = dataclasses.replace(WHOLE_MODEL_POLICY, warmup_runs=3, repeat=args.repeat)
    protocol = WholeModelProtocol(policy=policy, min_rounds=args.min_rounds,
                                  max_rounds=args.max_rounds, max_seconds=args.max_seconds)
    splits = digits_224(64, 32, 32)
    results: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()},
                               "input_shape": list(SHAPE), "models": {}}
    t_all = time.perf_counter()
    with start_local_daemon(threads=1) as daemon, DevicePool([daemon.client()]) as pool:
        info = pool.info
        results["conditions"] = (f"{info.cpu_model} x{info.cpu_count}, ORT {info.ort_version}, "
                                 f"CPUExecutionProvider, 1 thread")
        for name in args.models:
            t0 = time.perf_counter()
            row: dict[str, Any] = {}
            try:
                network, row["analysis"] = _analysis(name)
                path = args.workdir / f"{name}.sqlite"
                for old in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                    old.unlink(missing_ok=True)  # on demand from empty: counts the keys needed
                with LutStore.open(path, identity_for(info, SESSION)) as store:
                    rep = validate(store, pool, network, SESSION, variants=args.variants,
                                   seed=0, calibration=args.calibrate, protocol=protocol)
                    lut = {k: v for k, v in rep.to_dict().items() if k != "rows"}
                    lut["rows"] = [{k: r[k] for k in ("estimated_ms", "measured_ms",
                                                      "rel_error", "rounds", "tight",
                                                      "measured_ratio", "ratio_rel_error")}
                                   for r in rep.to_dict()["rows"]]  # type: ignore[attr-defined]
                    row["lut"] = lut
                    print(f"{name}: {json.dumps(row['analysis'])}\n  lut: median "
                          f"{rep.median_abs_rel_error:.1%} max {rep.max_abs_rel_error:.1%}; "
                          f"of the original: {rep.median_abs_ratio_error:.1%} / "
                          f"{rep.max_abs_ratio_error:.1%} "
                          f"({rep.keys_fetched} keys, {rep.seconds:.0f} s)", flush=True)
                    if not args.skip_adapt:
                        run = args.workdir / f"{name}-run"
                        shutil.rmtree(run, ignore_errors=True)
                        row["adapt"] = _adapt(network, store, pool, splits, protocol, args, run)
                        print(f"  adapt: {json.dumps(row['adapt'])}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report it, go on with the next model
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
                print(f"{name}: ERROR {row['error']}", flush=True)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results["models"][name] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))  # partial results survive
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(_table(results), flush=True)
    return 0


def _table(results: dict[str, Any]) -> str:
    lines = ["| model | units (NODE) | groups (kept) | LUT error median / max | "
             "as a fraction of the original | adapt |",
             "|---|---|---|---|---|---|"]
    for name, row in results["models"].items():
        if "error" in row:
            lines.append(f"| {name} | error: {row['error'][:80]} | | | | |")
            continue
        a = row["analysis"]
        nodes = sum(a["node_units"].values())
        lut = row.get("lut", {})
        err = (f"{lut['median_abs_rel_error']:.1%} / {lut['max_abs_rel_error']:.1%}"
               if lut else "")
        ratio_err = (f"{lut['median_abs_ratio_error']:.1%} / {lut['max_abs_ratio_error']:.1%}"
                     if lut else "")
        ad = row.get("adapt")
        adapt = (f"{ad['iterations']} it, {ad['original_ms']:.2f} -> {ad['final_ms']:.2f} ms "
                 f"({ad['speedup']:.2f}x)" if ad else "")
        lines.append(f"| {name} | {a['units']} ({nodes}) | {a['groups']} ({a['kept']}) | "
                     f"{err} | {ratio_err} | {adapt} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
