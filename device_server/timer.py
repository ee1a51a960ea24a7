"""Times an ONNX Runtime session the way TVM's time_evaluator does.

Warm-up: at least `warmup_runs` calls and at least `min_warmup_ms`. Then `repeat` samples, each
the mean of `number` back-to-back calls, with `number` chosen (when 0) so that one sample lasts
at least `min_repeat_ms`: well above the timer's resolution and the loop's own cost.
Inputs and outputs are bound once (IOBinding), so a call times the run, not numpy allocations.

A sample during which the OS switched the timing process out (`interference.preemptions`) is
taken again, up to `MAX_RETAKE_FACTOR` times `repeat` samples in all, so that another task's time
is not averaged in; the other load and steal on the daemon's cores during the samples travel
with the result (`interference.CpuMeter`). The figure the project acts on is a low quantile of
the clean samples with its interval (`stats.summarize`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from device_server.errors import DeadlineError, InvalidConfigError, ResourceLimitError
from device_server.inputs import InputFeed, graph_ranges, make_input
from device_server.interference import CpuMeter, preemptions
from device_server.spec import GraphOptimization, MeasurePolicy, SessionSpec
from device_server.stats import TimingStats, summarize

__all__ = ["PreparedSession", "create_session", "time_callable", "TimeBudget"]

log = logging.getLogger(__name__)

MAX_RETAKE_FACTOR = 3   # samples taken in all, at most, per `repeat` asked for

_ORT_LEVELS = {
    GraphOptimization.DISABLE_ALL: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    GraphOptimization.ENABLE_BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    GraphOptimization.ENABLE_EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    GraphOptimization.ENABLE_ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

@dataclass
class PreparedSession:
    """A session with inputs bound once; `run()` is one timed call."""

    session: ort.InferenceSession
    binding: ort.IOBinding
    create_ms: float

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)


def create_session(
    model_bytes: bytes,
    spec: SessionSpec,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    feeds: Mapping[str, InputFeed] | None = None,
) -> PreparedSession:
    """Creates an ORT session for `model_bytes` under `spec`, with its inputs bound once and
    run once to check that the model takes them.

    Inputs are fed as `feeds[name]` says (exact values, or random values in a range); the others
    random, within what the graph can take where it tells (`inputs.graph_ranges`: e.g. a
    Gather's indices stay inside its table). Symbolic input dimensions take
    `input_shapes[name]` when given, else 1.

    Raises:
        InvalidConfigError: the bytes are not a model ORT can load, a shape or value is bad, a
            feed names no input, or the model fails on its inputs (the message says which and
            how they were fed).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = spec.intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = _ORT_LEVELS[spec.graph_optimization]
    opts.log_severity_level = 3
    providers: list[str | tuple[str, dict[str, str]]] = [
        (spec.provider, dict(spec.provider_options))
    ]
    if spec.provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")  # for ops the accelerator lacks, as ORT does
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
    except Exception as exc:  # ORT raises several unrelated types for bad models
        raise InvalidConfigError(f"ONNX Runtime cannot load the model: {exc}") from exc
    create_ms = (time.perf_counter() - start) * 1e3

    rng = np.random.default_rng(seed)
    binding = session.io_binding()
    shapes = input_shapes or {}
    given = dict(feeds or {})
    names = [inp.name for inp in session.get_inputs()]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InvalidConfigError(f"the model has no input {unknown[0]!r}; its inputs are "
                                 f"{', '.join(names)}")
    if any(inp.type != "tensor(float)" and inp.name not in given
           for inp in session.get_inputs()):
        given = {**graph_ranges(model_bytes), **given}
    for inp in session.get_inputs():
        dims = shapes.get(inp.name)
        if dims is None:
            dims = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        elif len(dims) != len(inp.shape) or any(d <= 0 for d in dims):
            raise InvalidConfigError(
                f"input {inp.name!r} has rank {len(inp.shape)} ({inp.shape}); "
                f"got shape {list(dims)}"
            )
        data = make_input(inp.name, inp.type, dims, given.get(inp.name), rng)
        binding.bind_cpu_input(inp.name, data)
    for out in session.get_outputs():
        binding.bind_output(out.name)
    try:
        session.run_with_iobinding(binding)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types for bad inputs
        fed = "; ".join(f"{n}: {given[n].describe() if n in given else 'random normal'}"
                        for n in names)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InvalidConfigError(
            f"the model fails on its inputs ({fed}): {first}; give values or ranges "
            f"(netadapt-bench model --input NAME=int:LOW..HIGH, or --inputs FILE.npz)") from exc
    return PreparedSession(session=session, binding=binding, create_ms=create_ms)


@dataclass
class TimeBudget:
    """Limits on one measurement: the daemon's cap and the client's deadline (monotonic s)."""

    cap_s: float
    deadline: float | None = None

    def remaining_s(self, started: float) -> float:
        left = self.cap_s - (time.monotonic() - started)
        if self.deadline is not None:
            left = min(left, self.deadline - time.monotonic())
        return left

    def refuse(self, projected_s: float, started: float) -> None:
        """Raises before a phase that would overrun the cap or the client's deadline."""
        spent = time.monotonic() - started
        if projected_s + spent > self.cap_s:
            raise ResourceLimitError(
                f"measurement would take ~{projected_s + spent:.1f} s, over the daemon's cap of "
                f"{self.cap_s:.0f} s: lower repeat/number/min_repeat_ms or the layer size"
            )
        if self.deadline is not None and time.monotonic() + projected_s > self.deadline:
            raise DeadlineError(
                f"measurement needs ~{projected_s:.2f} s more but the client's deadline leaves "
                f"{max(0.0, self.deadline - time.monotonic()):.2f} s: raise the timeout"
            )


def time_callable(
    run: Callable[[], None],
    policy: MeasurePolicy,
    budget: TimeBudget,
    create_ms: float = 0.0,
) -> TimingStats:
    """Warm-up, then `repeat` samples of `number` calls; per-call milliseconds."""
    started = time.monotonic()
    clock = time.perf_counter
    t0 = clock()
    runs = 0
    while runs < policy.warmup_runs or (clock() - t0) * 1e3 < policy.min_warmup_ms:
        run()
        runs += 1
        if runs == 1:
            # One call tells how long the rest will take: refuse before spending it.
            first = clock() - t0
            projected = first * (max(policy.warmup_runs, 1) - 1) + max(
                policy.repeat * policy.min_repeat_ms / 1e3,
                first * policy.repeat * max(policy.number, 1),
            )
            budget.refuse(projected, started)
    per_call_s = (clock() - t0) / runs
    number = policy.number or max(1, math.ceil(policy.min_repeat_ms / 1e3 / per_call_s))
    budget.refuse(per_call_s * number * policy.repeat, started)

    clean: list[float] = []
    preempted: list[float] = []
    sample_s = per_call_s * number
    meter = CpuMeter()
    while len(clean) < policy.repeat:
        taken = len(clean) + len(preempted)
        if taken >= policy.repeat and (
            taken >= MAX_RETAKE_FACTOR * policy.repeat
            or budget.remaining_s(started) < 2 * sample_s
        ):
            break  # re-takes are bounded by count and by the time left
        switches = preemptions()
        start = clock()
        for _ in range(number):
            run()
        elapsed = clock() - start
        (clean if preemptions() == switches else preempted).append(elapsed * 1e3 / number)
    reading = meter.stop()
    # Too few clean samples to stand alone: keep them all (the count says how many were hit).
    samples = clean if len(clean) >= max(3, policy.repeat // 2) else clean + preempted
    return summarize(samples, number=number, warmup_runs=runs, session_create_ms=create_ms,
                     preempted_samples=len(preempted), other_load=reading.other_load,
                     steal=reading.steal)
