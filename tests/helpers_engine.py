"""A small adaptation set-up shared by the engine and executor tests: MobileNetV1 (width 0.25)
on 600 MNIST digits, a lookup table filled on demand from the loopback daemon. Also a data set
that kills the process reading it once, importable by Ray workers as
``tests.helpers_engine:KillOnce``."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from device_server.spec import SessionSpec
from host.data import DataSplits, load_dataset
from host.device.client import DeviceClient
from host.device.pool import DevicePool
from host.device.table_builder import ensure_overhead, identity_for
from host.device.whole_model import WholeModelProtocol
from host.engine.config import AdaptConfig, Budget
from host.engine.netadapt import NetAdapt
from host.lut_validation import calibrate, on_demand
from host.models.mobilenet_v1 import MobileNetV1
from host.network import Network, analyse
from lut.calibration import architecture_of
from lut.estimator import LatencyEstimator
from lut.store import LutStore

SESSION = SessionSpec(intra_op_threads=1)
Table = tuple[DevicePool, LutStore, LatencyEstimator]


def small_splits() -> DataSplits:
    full = load_dataset("mnist_5k", seed=0)
    return DataSplits(Subset(full.train, range(600)), Subset(full.holdout, range(200)),
                      Subset(full.test, range(200)), full.num_classes, full.input_shape)


def small_network() -> Network:
    torch.manual_seed(0)
    return analyse("mobilenet_v1", MobileNetV1(width_mult=0.25), (1, 1, 28, 28))


def small_table(address: str, path: Path) -> Table:
    pool = DevicePool([DeviceClient(address)])
    store = LutStore.open(path, identity_for(pool.info, SESSION))
    ensure_overhead(store, pool, SESSION)
    net = small_network()
    calibrate(store, pool, net, SESSION, count=5,
              protocol=WholeModelProtocol(min_rounds=2, max_rounds=2))
    est = LatencyEstimator.from_store(store, fetch=on_demand(store, pool, SESSION),
                                      architecture=architecture_of(net.specs()))
    return pool, store, est


# The default relative budget. The smallest network on the 8-channel grid measures 0.57-0.59 of
# the original when the machine is quiet and up to 0.69 under load (small networks carry more
# fixed cost, which load inflates), and a budget is met at its fraction less the 0.02 margin:
# 0.6 left a run refused at the start in CI (the floor at 0.5885, the aim 0.588).
BUDGET_FRACTION = 0.7


def small_config(**kw: object) -> AdaptConfig:
    """Small settings. Savings are not measured (`resolve_savings=0`) unless a test asks: runs
    that tests compare with each other must not have a measurement choose between proposals."""
    base = dict(budget=Budget(fraction=BUDGET_FRACTION), initial_reduction=0.08, short_term_steps=2,
                bn_batches=2, long_term_epochs=0, batch_size=32, seed=1, resolve_savings=0)
    base.update(kw)
    return AdaptConfig(**base)  # type: ignore[arg-type]


def small_engine(table: Table, splits: DataSplits, workdir: Path, config: AdaptConfig,
                 **kw: Any) -> NetAdapt:
    pool, _, est = table
    return NetAdapt(small_network(), splits, est, pool, SESSION, config, workdir,
                    progress=False, **kw)


class KillOnce(Dataset[Any]):
    """`base`, except that the first read anywhere SIGKILLs the reading process (a worker
    dying mid-task). `marker` records that it happened, so the retry reads normally."""

    def __init__(self, base: Dataset[Any], marker: Path) -> None:
        self.base, self.marker = base, marker

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return self.base[index]
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def tiny_checkpoint_and_foreign_table(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny_cnn checkpoint (8x8 digits) and an empty table of another device: an `adapt` that
    reaches the daemon reads its identity and refuses the table, before any training."""
    import onnxruntime as ort

    from device_server.stats import Conditions
    from host.models.registry import build_model_for
    from lut.store import LutIdentity, LutStore

    ckpt = tmp_path / "tiny.pt"
    torch.save(build_model_for("tiny_cnn", (1, 8, 8), 10).state_dict(), ckpt)
    other = LutIdentity(conditions=Conditions(
        device_fingerprint="0123456789abcdef", ort_version=ort.__version__,
        provider="CPUExecutionProvider", intra_op_threads=1, graph_optimization="enable_all"))
    table = tmp_path / "t.sqlite"
    LutStore.open(table, other).close()
    return ckpt, table
