"""Whole networks measured on the device: the ground truth a lookup table is checked against.

Networks are uploaded once (by content hash) and timed in interleaved passes — every network
once per pass — so that drift of the device over minutes hits all of them alike; the figure
kept is the median over passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import TimingStats, summarize
from host.client import DeviceClient

__all__ = ["WHOLE_MODEL_POLICY", "measure_networks"]

WHOLE_MODEL_POLICY = MeasurePolicy(warmup_runs=10, min_warmup_ms=50, repeat=20, min_repeat_ms=5)


def measure_networks(
    client: DeviceClient,
    blobs: Sequence[bytes],
    session: SessionSpec,
    passes: int = 3,
    policy: MeasurePolicy = WHOLE_MODEL_POLICY,
    on_pass: Callable[[int], None] | None = None,
) -> list[TimingStats]:
    """One distribution per network: the per-pass medians (median of medians is `median_ms`)."""
    shas = [client.upload_model(b) for b in blobs]
    medians: list[list[float]] = [[] for _ in shas]
    for p in range(passes):
        order = range(len(shas)) if p % 2 == 0 else reversed(range(len(shas)))
        for i in order:
            medians[i].append(client.measure_model(shas[i], session, policy).timing.median_ms)
        if on_pass is not None:
            on_pass(p)
    return [summarize(m) for m in medians]
