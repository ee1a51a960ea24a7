"""Shared fixtures: a real daemon on an ephemeral loopback port, a fast timing policy, and the
small adaptation set-up (data, table) of the engine and executor tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from device_server.server import RunningServer, ServerConfig, running_server
from device_server.spec import MeasurePolicy
from protos import device_pb2_grpc as pb_grpc

# Enough samples to be a distribution, few enough to keep the suite fast.
FAST_POLICY = MeasurePolicy(warmup_runs=2, min_warmup_ms=2.0, repeat=5, min_repeat_ms=1.0)


@pytest.fixture(scope="session")
def daemon() -> Iterator[RunningServer]:
    with running_server(ServerConfig(host="127.0.0.1", port=0, grace_s=1.0)) as running:
        yield running


@pytest.fixture(scope="module")
def splits() -> Any:
    """600 / 200 / 200 MNIST digits (tests.helpers_engine.small_splits)."""
    from tests.helpers_engine import small_splits

    return small_splits()


@pytest.fixture(scope="module")
def table(daemon: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(pool, store, estimator) for the small MobileNetV1, filled on demand from `daemon`."""
    from tests.helpers_engine import small_table

    return small_table(daemon.address, tmp_path_factory.mktemp("lut") / "t.sqlite")


@pytest.fixture()
def stub(daemon: RunningServer) -> Iterator[pb_grpc.DeviceServiceStub]:
    with grpc.insecure_channel(daemon.address) as channel:
        yield pb_grpc.DeviceServiceStub(channel)
