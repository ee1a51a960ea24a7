"""`make bench-run`: does `make run`'s job land where its budget says, run after run?

Runs the main job (the `make run` command line: MobileNetV1 width 0.5 on the shipped MNIST
digits, half the measured latency, a daemon on loopback) `--runs` times, each in a fresh empty
folder as a fresh clone would (no table, no cached base model), optionally beside a seeded
noisy neighbour on every core (`--noise`, host/device/noisy_neighbour.py), and reports for each run
the final ratio to the original measured in the same passes (with its 95% interval) against the
budget, and the test accuracy.

Target (issue: trustworthy latency): the final ratio between 0.85x and 1.0x the budget every
time, test accuracies within 1.5 points of each other.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from host.device.noisy_neighbour import NoisyNeighbour

ROOT = Path(__file__).resolve().parent.parent
# Keep in step with the Makefile's `run` target.
RUN_ARGS = ["adapt", "--model", "mobilenet_v1", "--model-arg", "width_mult=0.5",
            "--data", "mnist_5k", "--budget", "0.5", "--base-epochs", "3",
            "--initial-reduction", "0.05", "--short-term-steps", "10",
            "--long-term-epochs", "5", "--workers", "2", "--workdir", "run", "--json"]


def one_run(noise: bool, seed: int) -> dict[str, object]:
    exe = Path(sys.executable).parent / "netadapt-host"
    with tempfile.TemporaryDirectory(prefix="netadapt-bench-run-") as tmp:
        env = dict(os.environ, NETADAPT_HOME=str(Path(tmp) / ".netadapt"))
        neighbour = (NoisyNeighbour(seed=seed, duty=0.5, seconds=3600) if noise
                     else contextlib.nullcontext())
        t0 = time.monotonic()
        with neighbour:
            proc = subprocess.run([str(exe), *RUN_ARGS], cwd=tmp, env=env, text=True,
                                  capture_output=True)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            return {"noise": noise, "error": proc.stderr.strip().splitlines()[-1:],
                    "seconds": seconds}
        summary = json.loads(proc.stdout)
        history = [json.loads(line) for line in
                   (Path(tmp) / "run" / "history.jsonl").read_text().splitlines()]
    ratio = summary["final_ratio"]
    fraction = summary["budget_fraction"]
    return {
        "noise": noise,
        "seconds": round(seconds, 1),
        "iterations": summary["iterations"],
        "final_ratio": ratio,
        "budget_fraction": fraction,
        "of_budget": ratio["value"] / fraction,
        "speedup": summary["speedup"],
        "final_latency_ms": summary["final_latency_ms"],
        "original_latency_final_pass_ms": summary["original_latency_final_pass_ms"],
        "original_accuracy": summary["original_accuracy"],
        "final_accuracy": summary["final_accuracy"],
        # [network][pass] ms of the final interleaved pass: how interference moved the ratio.
        "final_passes_ms": summary.get("final_passes_ms"),
        "budget_checks": [h["budget_check"] for h in history if h.get("budget_check")],
        # Kept so a run that ends far from its budget can be read afterwards.
        "history": [{k: v for k, v in h.items() if k != "proposals"} for h in history],
        "stderr": proc.stderr.splitlines()[-200:],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per condition (default 3)")
    parser.add_argument("--conditions", default="quiet,noise",
                        help="comma-separated: quiet, noise (default both, interleaved)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/run.json"))
    args = parser.parse_args(argv)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    results = []
    for i in range(args.runs):
        for cond in conditions:  # interleaved, so a slow hour hits both alike
            r = one_run(cond == "noise", seed=i)
            r["started_run"] = i
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "budget_checks"}), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
    for cond in conditions:
        rs = [r for r in results if r["noise"] == (cond == "noise") and "error" not in r]
        if rs:
            ofb = [float(r["of_budget"]) for r in rs]  # type: ignore[arg-type]
            acc = [float(r["final_accuracy"]) for r in rs]  # type: ignore[arg-type]
            print(f"{cond}: final / budget {min(ofb):.3f} .. {max(ofb):.3f}; test accuracy "
                  f"{min(acc):.4f} .. {max(acc):.4f} (spread {100 * (max(acc) - min(acc)):.1f} "
                  f"points) over {len(rs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
