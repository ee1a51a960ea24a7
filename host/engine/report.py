"""What an adaptation run leaves in its folder besides checkpoints and history.jsonl:
summary.json, the final model (TorchScript that loads without our code, and ONNX), report.md,
and a plot of accuracy against latency across iterations beside the uniform width-multiplier
baseline."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from host.engine.config import AdaptConfig
from host.engine.netadapt import AdaptResult
from host.graph.onnx_export import export_onnx
from host.graph.surgery import uniform_width_config
from host.network import Network
from host.training import TrainConfig, evaluate, fine_tune, recalibrate_batchnorm
from lut.estimator import LatencyEstimator

__all__ = ["BaselinePoint", "uniform_baseline", "write_outputs"]

UNIFORM_FRACTIONS = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)


@dataclass(frozen=True)
class BaselinePoint:
    fraction: float
    estimated_latency_ms: float
    holdout_accuracy: float


def uniform_baseline(network: Network, splits: object, estimator: LatencyEstimator,
                     config: AdaptConfig,
                     fractions: Sequence[float] = UNIFORM_FRACTIONS) -> list[BaselinePoint]:
    """Every layer cut by the same fraction (rounded to the grid), from the same base model,
    with the same BN re-estimation and short-term fine-tuning a proposal gets."""
    points = []
    for fraction in fractions:
        cfg = uniform_width_config(network.groups, fraction, round_to=config.step)
        model = network.pruned(cfg, config.importance)
        recalibrate_batchnorm(model, splits.train, num_batches=config.bn_batches,  # type: ignore[attr-defined]
                              seed=config.seed)
        if config.short_term_steps:
            fine_tune(model, splits.train, config.short_term_steps,  # type: ignore[attr-defined]
                      TrainConfig(batch_size=config.batch_size, lr=config.lr, seed=config.seed))
        points.append(BaselinePoint(fraction, estimator.estimate(network.specs(cfg)),
                                    evaluate(model, splits.holdout)))  # type: ignore[attr-defined]
    return points


def _plot(result: AdaptResult, baseline: Sequence[BaselinePoint], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = [result.original_latency_ms]
    ys = [result.original_holdout_accuracy]
    for r in result.history:
        xs.append(r.estimated_latency_ms)
        ys.append(r.holdout_accuracy)
    ax.plot(xs, ys, "o-", ms=3, label="NetAdapt iterations (estimated latency)")
    if baseline:
        ax.plot([b.estimated_latency_ms for b in baseline], [b.holdout_accuracy for b in baseline],
                "s--", label="uniform width multiplier (same fine-tuning)")
    ax.axvline(result.budget_ms, color="grey", ls=":", label="budget")
    ax.scatter([result.final_latency_ms], [result.final_holdout_accuracy], marker="*", s=120,
               color="red", zorder=5, label="final (measured, after long-term tuning)")
    ax.set_xlabel("latency on the device (ms)")
    ax.set_ylabel("holdout accuracy")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(workdir: Path, result: AdaptResult, model: nn.Module, network: Network,
                  config: AdaptConfig, baseline: Sequence[BaselinePoint],
                  extra: dict[str, object] | None = None) -> dict[str, object]:
    """Writes the run's deliverables; returns the summary written to summary.json."""
    example = torch.zeros(network.input_shape)
    traced = torch.jit.trace(model.eval(), example)
    traced.save(str(workdir / "final_model.pt"))  # loads with torch.jit.load, no code needed
    export_onnx(model, network.input_shape, workdir / "final_model.onnx")
    summary: dict[str, object] = result.summary()
    summary.update({
        "model": network.name,
        "input_shape": list(network.input_shape),
        "config": dataclasses.asdict(config),
        "uniform_baseline": [dataclasses.asdict(b) for b in baseline],
        **(extra or {}),
    })
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(result, baseline, workdir / "accuracy_vs_latency.png")
    lines = [
        f"# NetAdapt run: {network.name}",
        "",
        "| | original | adapted |",
        "|---|---|---|",
        f"| latency on the device (ms, same pass) | {result.original_latency_final_pass_ms:.4f} "
        f"| {result.final_latency_ms:.4f} |",
        f"| test accuracy | {result.original_accuracy:.4f} | {result.final_accuracy:.4f} |",
        f"| holdout accuracy | {result.original_holdout_accuracy:.4f} | "
        f"{result.final_holdout_accuracy:.4f} |",
        "",
        f"Budget {config.budget.describe()} ({result.budget_ms:.4f} ms at the start). Final "
        f"interleaved passes: {result.describe_latency()} (95% intervals, "
        f"{'met' if result.budget_met else 'missed'}); {result.iterations} iterations in "
        f"{result.seconds:.0f} s.",
        "",
        "![accuracy vs latency](accuracy_vs_latency.png)",
        "",
        "| iteration | group | channels kept | estimated ms | measured ms | holdout acc |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.history:
        measured = f"{r.measured_latency_ms:.4f}" if r.measured_latency_ms else ""
        lines.append(f"| {r.iteration} | {r.group_id} ({r.group_root}) | "
                     f"{r.channels[r.group_id]} | {r.estimated_latency_ms:.4f} | {measured} | "
                     f"{r.holdout_accuracy:.4f} |")
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    return summary
