"""`make bench-reliability`: what breaks, tried on purpose, and what the system did about it.

1. Bad inputs, by RPC: malformed requests to a token-protected daemon running in a folder that
   holds its token (as a deployed one does). Each must get the status it deserves with a message
   that is not "internal error", and the daemon must still measure afterwards.
2. Hostile model files: every corner of ONNX that can point at a file (tests/helpers_hostile.py),
   uploaded; each must be refused naming its tensor, and no reply may carry the token's bytes.
3. Clients killed mid-measurement: a client process asks for a ~20 s measurement and is
   SIGKILLed mid-way while another client waits; the wait is read from the daemon's own clock
   (the next measurement's `started_unix_ns` minus the kill time). Unary calls, streams, and a
   killed client that was still queued.
4. Workers killed mid-run: NetAdapt with two local workers, a worker SIGKILLed mid-proposal at
   iteration 0 and at iteration 1; the one-line message, and whether `--resume` gives the
   uninterrupted run (same history, same weights).
5. The device lost mid-run (its daemon stopped after iteration 0), a full disk while
   checkpointing and while storing table rows (a real tmpfs filled up; skipped without root),
   and a `lut build` SIGKILLed mid-build: rows committed before each failure against rows
   found after it. "Rows lost" must be 0 everywhere.

Every figure is measured in this run; nothing is assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test helpers (hostile models, killing data sets)

import grpc  # noqa: E402
import torch  # noqa: E402

from device_server import wire  # noqa: E402
from device_server.spec import LayerSpec, MeasurePolicy, NodeOperand  # noqa: E402
from host.data import DataSplits  # noqa: E402
from host.device.client import DeviceClient, DeviceError, Measurement  # noqa: E402
from host.device.local_daemon import start_local_daemon  # noqa: E402
from host.device.table_builder import build_table, identity_for  # noqa: E402
from host.engine.config import Budget  # noqa: E402
from host.engine.failures import RunFailure  # noqa: E402
from host.engine.netadapt import IterationRecord, NetAdapt  # noqa: E402
from lut.keys import plan_keys  # noqa: E402
from lut.store import LutDiskFull, LutStore  # noqa: E402
from protos import device_pb2 as pb  # noqa: E402
from protos import device_pb2_grpc as pb_grpc  # noqa: E402
from tests.helpers_engine import (  # noqa: E402
    SESSION,
    KillOnce,
    small_config,
    small_engine,
    small_network,
    small_splits,
    small_table,
)
from tests.helpers_failures import TmpfsUnavailable, fill, small_tmpfs  # noqa: E402
from tests.helpers_hostile import HOSTILE_MODELS, NAMED  # noqa: E402

TOKEN = "0123456789abcdef"  # 16 bytes: what the hostile models would read as four float32
FAST = MeasurePolicy(warmup_runs=2, min_warmup_ms=2.0, repeat=5, min_repeat_ms=1.0)
CONV = LayerSpec.create("conv2d", (1, 32, 28, 28), out_channels=64, kernel=3, padding=1)
SMALL = LayerSpec.create("conv2d", (1, 8, 8, 8), out_channels=8, kernel=3, padding=1)
LONG = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=400, min_repeat_ms=50)  # ~20 s


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def deployed_daemon(folder: Path) -> Iterator[str]:
    """A daemon in its own folder with its token there, as `make deploy-device` leaves it."""
    (folder / "token").write_text(TOKEN)
    with (folder / "daemon.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "device_server", "serve", "--port", "0", "--port-file",
             "port", "--token-file", "token"], cwd=folder, env=_env(),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "port").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((folder / "daemon.log").read_text())
            time.sleep(0.05)
        yield f"127.0.0.1:{(folder / 'port').read_text().strip()}"
    finally:
        proc.terminate()
        proc.wait(60)


# -- 1. bad inputs ------------------------------------------------------------------------------
def _layer(**fields: Any) -> pb.LayerConfig:
    base: dict[str, Any] = {"op": pb.CONV2D, "input_shape": [1, 8, 8, 8], "out_channels": 8,
                            "kernel": [3], "padding": [1]}
    base.update(fields)
    return pb.LayerConfig(**base)


def _measure(layer: pb.LayerConfig | None = None, **kw: Any) -> pb.MeasureRequest:
    return pb.MeasureRequest(request_id=kw.pop("request_id", "bad"),
                             layer=layer or _layer(),
                             policy=kw.pop("policy", wire.policy_to_proto(FAST)), **kw)


def _bad_layers() -> list[tuple[str, pb.LayerConfig, str]]:
    node = LayerSpec.node("EPContext", [NodeOperand.input((1, 4))], [(1, 4)],
                          {"embed_mode": 0, "ep_cache_context": "token"})
    unknown = LayerSpec.node("NoSuchOp", [NodeOperand.input((1, 4))], [(1, 4)])
    return [
        ("op unset", _layer(op=pb.OP_KIND_UNSPECIFIED), "INVALID_ARGUMENT"),
        ("op 99", _layer(op=99), "INVALID_ARGUMENT"),
        ("activation 99", _layer(activation=99), "INVALID_ARGUMENT"),
        ("empty shape", _layer(input_shape=[]), "INVALID_ARGUMENT"),
        ("negative dims", _layer(input_shape=[1, -8, 8, 8]), "INVALID_ARGUMENT"),
        ("zero out_channels", _layer(out_channels=0), "INVALID_ARGUMENT"),
        ("groups do not divide", _layer(groups=3), "INVALID_ARGUMENT"),
        ("kernel over input", _layer(kernel=[31], padding=[0]), "INVALID_ARGUMENT"),
        ("three kernel values", _layer(kernel=[3, 3, 3]), "INVALID_ARGUMENT"),
        ("stride 0", _layer(stride=[0]), "INVALID_ARGUMENT"),
        ("residual on linear", _layer(op=pb.LINEAR, input_shape=[1, 8], residual=True),
         "INVALID_ARGUMENT"),
        ("batch norm on a pool", _layer(op=pb.MAX_POOL, batch_norm=True), "INVALID_ARGUMENT"),
        ("pool padding over half the kernel", _layer(op=pb.MAX_POOL, padding=[2]),
         "INVALID_ARGUMENT"),
        ("16 GiB of tensors", _layer(input_shape=[64, 512, 512, 512], out_channels=512),
         "RESOURCE_EXHAUSTED"),
        ("EPContext node naming a file", wire.layer_to_proto(node), "INVALID_ARGUMENT"),
        ("unknown ONNX op", wire.layer_to_proto(unknown), "INVALID_ARGUMENT"),
    ]


def _bad_sessions() -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("negative threads", {"session": pb.SessionOptions(intra_op_threads=-1)},
         "INVALID_ARGUMENT"),
        ("graph optimisation 99", {"session": pb.SessionOptions(graph_optimization=99)},
         "INVALID_ARGUMENT"),
        ("unknown provider", {"session": pb.SessionOptions(provider="NoSuchProvider")},
         "FAILED_PRECONDITION"),
        ("provider option naming a path",
         {"session": pb.SessionOptions(provider_options={"cache_dir": "/tmp"})},
         "INVALID_ARGUMENT"),
        ("provider option naming a library",
         {"session": pb.SessionOptions(provider_options={"backend_path": "libQnnHtp.so"})},
         "INVALID_ARGUMENT"),
        ("repeat -1", {"policy": pb.MeasurePolicy(repeat=-1)}, "INVALID_ARGUMENT"),
        ("number -1", {"policy": pb.MeasurePolicy(number=-1)}, "INVALID_ARGUMENT"),
        ("warm-up -5", {"policy": pb.MeasurePolicy(warmup_runs=-5)}, "INVALID_ARGUMENT"),
        ("min_repeat_ms -1", {"policy": pb.MeasurePolicy(min_repeat_ms=-1)},
         "INVALID_ARGUMENT"),
    ]


def _chunks(sha: str = "", total: int = 0, sizes: tuple[int, ...] = (),
            data: bytes = b"") -> list[pb.ModelChunk]:
    out = []
    offset = 0
    for i, size in enumerate(sizes):
        part = data[offset:offset + size] if data else b"\0" * size
        offset += size
        out.append(pb.ModelChunk(sha256=sha if i == 0 else "", total_bytes=total if i == 0
                                 else 0, data=part))
    return out


def _bad_uploads() -> list[tuple[str, list[pb.ModelChunk], str]]:
    import hashlib

    junk = b"not a model " * 8000
    sha = hashlib.sha256(junk).hexdigest()
    invalid = b"\x08\x07"  # parses as a ModelProto (ir_version 7) with no graph
    k64 = 64 * 1024
    return [
        ("no chunks", [], "INVALID_ARGUMENT"),
        ("no sha in the first chunk", _chunks("", 10, (10,)), "INVALID_ARGUMENT"),
        ("sha not hex", _chunks("z" * 64, 10, (10,)), "INVALID_ARGUMENT"),
        ("total_bytes 0", _chunks("a" * 64, 0, (10,)), "INVALID_ARGUMENT"),
        ("over the size cap", _chunks("a" * 64, 10**12, (10,)), "RESOURCE_EXHAUSTED"),
        ("chunk over 1 MiB", _chunks("a" * 64, 2**21, (2**20 + 1,)), "INVALID_ARGUMENT"),
        ("small chunk not last", _chunks("a" * 64, k64 + 20, (10, k64 + 10)),
         "INVALID_ARGUMENT"),
        ("more bytes than announced", _chunks("a" * 64, 5, (10,)), "INVALID_ARGUMENT"),
        ("fewer bytes than announced", _chunks("a" * 64, 20, (10,)), "INVALID_ARGUMENT"),
        ("hash mismatch", _chunks("a" * 64, len(junk), (len(junk),), junk),
         "INVALID_ARGUMENT"),
        ("not ONNX", _chunks(sha, len(junk), (len(junk),), junk), "INVALID_ARGUMENT"),
        ("ONNX without a graph",
         _chunks(hashlib.sha256(invalid).hexdigest(), 2, (2,), invalid), "INVALID_ARGUMENT"),
    ]


def _outcome(call: Callable[[], Any], want: str) -> dict[str, Any]:
    try:
        reply = call()
        if isinstance(reply, list):  # a stream: the in-band status of its first item
            failed = reply[0].HasField("status")
            got = wire.status_code_name(reply[0].status) if failed else "OK"
            message = reply[0].status.message
        else:
            got, message = "OK", ""
    except grpc.RpcError as exc:
        got, message = exc.code().name, exc.details() or ""
    return {"status": got, "expected": want, "message": message[:300],
            "ok": got == want and bool(message) and "internal error" not in message.lower()
            and TOKEN not in message}


def bench_bad_inputs(address: str) -> dict[str, Any]:
    meta = (("authorization", f"Bearer {TOKEN}"),)
    results: dict[str, list[dict[str, Any]]] = {}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DeviceServiceStub(channel)

        def add(rpc: str, name: str, call: Callable[[], Any], want: str) -> None:
            results.setdefault(rpc, []).append({"input": name, **_outcome(call, want)})

        add("GetDeviceInfo", "no token",
            lambda: stub.GetDeviceInfo(pb.GetDeviceInfoRequest(), timeout=30),
            "UNAUTHENTICATED")
        add("GetDeviceInfo", "wrong token",
            lambda: stub.GetDeviceInfo(pb.GetDeviceInfoRequest(), timeout=30,
                                       metadata=(("authorization", "Bearer nope"),)),
            "UNAUTHENTICATED")
        add("Measure", "no token", lambda: stub.Measure(_measure(), timeout=30),
            "UNAUTHENTICATED")
        for name, layer, want in _bad_layers():
            add("Measure", name, lambda layer=layer: stub.Measure(  # type: ignore[misc]
                _measure(layer), timeout=30, metadata=meta), want)
            add("MeasureStream", name, lambda layer=layer: list(stub.MeasureStream(  # type: ignore[misc]
                iter([_measure(layer)]), timeout=30, metadata=meta)), want)
        for name, fields, want in _bad_sessions():
            add("Measure", name, lambda fields=fields: stub.Measure(  # type: ignore[misc]
                _measure(**fields), timeout=30, metadata=meta), want)
            add("MeasureOverhead", name, lambda fields=fields: stub.MeasureOverhead(  # type: ignore[misc]
                pb.MeasureOverheadRequest(**fields), timeout=30, metadata=meta), want)
        add("Measure", "deadline shorter than the measurement",
            lambda: stub.Measure(_measure(wire.layer_to_proto(CONV),
                                          policy=wire.policy_to_proto(LONG)),
                                 timeout=3, metadata=meta), "DEADLINE_EXCEEDED")
        for name, chunks, want in _bad_uploads():
            add("UploadModel", name, lambda chunks=chunks: stub.UploadModel(  # type: ignore[misc]
                iter(chunks), timeout=30, metadata=meta), want)
        for sha in ("../token", "token", "", "z" * 64, "a" * 63):
            add("HasModel", f"sha {sha!r}", lambda sha=sha: stub.HasModel(  # type: ignore[misc]
                pb.ModelRef(sha256=sha), timeout=30, metadata=meta), "INVALID_ARGUMENT")
            add("MeasureModel", f"sha {sha!r}", lambda sha=sha: stub.MeasureModel(  # type: ignore[misc]
                pb.MeasureModelRequest(sha256=sha), timeout=30, metadata=meta),
                "INVALID_ARGUMENT")
        add("MeasureModel", "never uploaded", lambda: stub.MeasureModel(
            pb.MeasureModelRequest(sha256="a" * 64), timeout=30, metadata=meta), "NOT_FOUND")
        sha = _upload_gemm(address)
        for name, shapes in (("rank mismatch", {"x": pb.InputShape(dims=[4])}),
                             ("negative dims", {"x": pb.InputShape(dims=[-1, 64])})):
            add("MeasureModel", name, lambda shapes=shapes: stub.MeasureModel(  # type: ignore[misc]
                pb.MeasureModelRequest(sha256=sha, input_shapes=shapes,
                                       policy=wire.policy_to_proto(FAST)),
                timeout=30, metadata=meta), "INVALID_ARGUMENT")
        add("MeasureModel", "a model the runtime cannot run", lambda: stub.MeasureModel(
            pb.MeasureModelRequest(sha256=_upload_unrunnable(address),
                                   policy=wire.policy_to_proto(FAST)),
            timeout=30, metadata=meta), "INVALID_ARGUMENT")
    with DeviceClient(address, token=TOKEN) as client:
        still = client.measure(SMALL, policy=FAST).timing.median_ms > 0
    by_rpc = {rpc: {"tried": len(rows), "as_expected": sum(r["ok"] for r in rows),
                    "internal": sum(r["status"] == "INTERNAL" for r in rows)}
              for rpc, rows in results.items()}
    return {"total": sum(v["tried"] for v in by_rpc.values()),
            "as_expected": sum(v["as_expected"] for v in by_rpc.values()),
            "by_rpc": by_rpc, "still_measuring_after": still,
            "not_as_expected": [dict(r, rpc=rpc) for rpc, rows in results.items()
                                for r in rows if not r["ok"]]}


def _upload_gemm(address: str) -> str:
    from tests.test_client import gemm_model

    with DeviceClient(address, token=TOKEN) as client:
        return client.upload_model(gemm_model(64, 32))


def _upload_unrunnable(address: str) -> str:
    from tests.test_daemon_logs import _runtime_failing_model

    with DeviceClient(address, token=TOKEN) as client:
        return client.upload_model(_runtime_failing_model())


# -- 2. hostile model files ---------------------------------------------------------------------
def bench_hostile_models(address: str) -> dict[str, Any]:
    rows = []
    with DeviceClient(address, token=TOKEN, retries=0) as client:
        for name, build in sorted(HOSTILE_MODELS.items()):
            blob = build().SerializeToString()
            try:
                client.measure_model(blob, policy=FAST)
                rows.append({"model": name, "refused": False, "names_it": False, "token": False})
            except DeviceError as exc:
                rows.append({"model": name, "refused": exc.code == "INVALID_ARGUMENT",
                             "names_it": NAMED[name] in exc.message,
                             "token": TOKEN in exc.message})
    return {"tried": len(rows), "refused": sum(r["refused"] for r in rows),
            "named": sum(r["names_it"] for r in rows),
            "token_bytes_in_any_reply": any(r["token"] for r in rows), "models": rows}


# -- 3. clients killed mid-measurement ----------------------------------------------------------
_CLIENT = """
import json, sys
from device_server.spec import LayerSpec, MeasurePolicy
from host.device.client import DeviceClient
spec = LayerSpec.from_dict(json.loads(sys.argv[2]))
policy = MeasurePolicy(warmup_runs=1, min_warmup_ms=0, repeat=400, min_repeat_ms=50)
with DeviceClient(sys.argv[1], token=sys.argv[4], timeout_s=120, retries=0) as client:
    if sys.argv[3] == "stream":
        list(client.measure_many([spec] * 5, policy=policy))
    else:
        client.measure(spec, policy=policy)
"""


def _depth(client: DeviceClient) -> int:
    return client.device_info().queue_depth


def _wait_depth(client: DeviceClient, depth: int, settle_s: float = 0.0) -> None:
    deadline = time.monotonic() + 120
    while _depth(client) < depth:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue never reached {depth}")
        time.sleep(0.02)
    time.sleep(settle_s)


def _one_kill(address: str, mode: str) -> dict[str, Any]:
    def client(kind: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", _CLIENT, address, CONV.key(), kind, TOKEN],
                                env=_env(), stdin=subprocess.DEVNULL)

    with DeviceClient(address, token=TOKEN) as probe:
        victim = client("stream" if mode == "stream" else "unary")
        _wait_depth(probe, 1, settle_s=1.5)  # its ~20 s measurement is running
        queued = None
        if mode == "queued":  # a second client waits behind the running one; it is killed
            queued = client("unary")
            _wait_depth(probe, 2)
        out: list[Any] = []
        thread = threading.Thread(target=lambda: out.append(_measure_small(address)))
        thread.start()
        _wait_depth(probe, 3 if queued else 2)
        if queued is not None:
            queued.kill()
            queued.wait()
            time.sleep(0.5)
        killed_ns = time.time_ns()
        victim.kill()
        victim.wait()
        thread.join(180)
    (result,) = out
    if not isinstance(result, Measurement):
        return {"mode": mode, "error": str(result)}
    return {"mode": mode, "wait_s": round((result.started_unix_ns - killed_ns) / 1e9, 3)}


def _measure_small(address: str) -> Measurement | DeviceError:
    with DeviceClient(address, token=TOKEN, timeout_s=120, retries=0) as client:
        try:
            return client.measure(SMALL, policy=FAST)
        except DeviceError as exc:
            return exc


def bench_killed_clients(address: str, trials: int) -> dict[str, Any]:
    rows = [_one_kill(address, mode) for _ in range(trials)
            for mode in ("unary", "stream", "queued")]
    waits = [r["wait_s"] for r in rows if "wait_s" in r]
    return {"killed": len(rows), "worst_wait_s": max(waits) if waits else None,
            "median_wait_s": statistics.median(waits) if waits else None,
            "abandoned_job_s": "~20 (the killed client's measurement, repeat 400 x 50 ms)",
            "trials": rows}


# -- 4-5. host failures -------------------------------------------------------------------------
CONFIG = dict(budget=Budget(ms=1e-3), max_iterations=2)


def _engine(table: Any, splits: DataSplits, workdir: Path, **kw: Any) -> NetAdapt:
    engine = small_engine(table, splits, workdir,
                          small_config(**CONFIG, workers=kw.pop("workers", 1)), **kw)
    engine.reachable_ms = lambda: 0.0  # type: ignore[method-assign]
    return engine


def _history(workdir: Path) -> list[dict[str, Any]]:
    """Each iteration's record without its wall-clock seconds (the one field that differs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (workdir / "history.jsonl").read_text().splitlines()]


def _same(a: NetAdapt, b: NetAdapt) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.final_model.state_dict().values(),
                                                  b.final_model.state_dict().values(),
                                                  strict=True))


class _KillAtIteration(KillOnce):
    """Kills the first reader once `armed` exists (the run arms it after an iteration)."""

    def __init__(self, base: Any, marker: Path, armed: Path) -> None:
        super().__init__(base, marker)
        self.armed = armed

    def __getitem__(self, index: int) -> Any:
        if not self.armed.exists():
            return self.base[index]
        return super().__getitem__(index)


def bench_host_failures(folder: Path, address: str) -> dict[str, Any]:
    splits = small_splits()
    table = small_table(address, folder / "t.sqlite")
    store = table[1]
    reference_dir = folder / "reference"
    reference = _engine(table, splits, reference_dir)
    reference.run()
    out: dict[str, Any] = {"workers_killed": [], "lut_rows_lost": {}}
    for at in (0, 1):
        marker, armed = folder / f"killed-{at}", folder / f"armed-{at}"
        poisoned = DataSplits(_KillAtIteration(splits.train, marker, armed), splits.holdout,
                              splits.test, splits.num_classes, splits.input_shape)
        if at == 0:
            armed.touch()

        def arm(record: IterationRecord, at: int = at, armed: Path = armed) -> None:
            if record.iteration == at - 1:
                armed.touch()

        workdir = folder / f"killed-at-{at}"
        rows_before = store.count()
        t0 = time.monotonic()
        try:
            _engine(table, poisoned, workdir, workers=2, on_iteration=arm).run()
            message = "(no failure)"
        except RunFailure as exc:
            message = str(exc)
        failed_after_s = time.monotonic() - t0
        rows_after = store.count()
        resumed = _engine(table, splits, workdir)
        resumed.run(resume=True)
        out["workers_killed"].append({
            "at_iteration": at, "message": message, "failed_after_s": round(failed_after_s, 1),
            "resumed_identically": _history(workdir) == _history(reference_dir)
            and _same(resumed, reference)})
        out["lut_rows_lost"][f"worker killed at iteration {at}"] = max(0, rows_before -
                                                                        rows_after)
    out["device_lost"] = _device_lost(folder, splits)
    out["disk_full"] = _disk_full(folder, table, splits, reference_dir, reference)
    out["lut_rows_lost"].update(out["device_lost"].pop("rows_lost"))
    out["lut_rows_lost"].update(out["disk_full"].pop("rows_lost", {}))
    out["lut_rows_lost"].update(_lut_build_killed(folder, address))
    table[0].close()
    store.close()
    return out


def _device_lost(folder: Path, splits: DataSplits) -> dict[str, Any]:
    workdir, lut = folder / "device-lost", folder / "device-lost.sqlite"
    with start_local_daemon() as first:
        table = small_table(first.address, lut)

        def lose(record: IterationRecord) -> None:
            if record.iteration == 0:
                first.stop()

        before = table[1].count()
        try:
            _engine(table, splits, workdir, on_iteration=lose).run()
            message = "(no failure)"
        except RunFailure as exc:
            message = str(exc)
        committed = table[1].count()
        table[0].close()
        table[1].close()
    with start_local_daemon() as second:
        table = small_table(second.address, lut)
        after = table[1].count()
        _engine(table, splits, workdir).run(resume=True)
        table[0].close()
        table[1].close()
    return {"message": message, "rows_before_run": before,
            "resumed_iterations": [r["iteration"] for r in _history(workdir)],
            "rows_lost": {"device lost mid-run": max(0, committed - after)}}


def _disk_full(folder: Path, table: Any, splits: DataSplits, reference_dir: Path,
               reference: NetAdapt) -> dict[str, Any]:
    try:
        with small_tmpfs(folder / "disk", size_kib=32 * 1024) as disk:
            filler: list[Path] = []

            def fill_disk(record: IterationRecord) -> None:
                if record.iteration == 0:
                    filler.append(fill(disk))

            workdir = disk / "run"
            try:
                _engine(table, splits, workdir, on_iteration=fill_disk).run()
                checkpoint = "(no failure)"
            except RunFailure as exc:
                checkpoint = str(exc)
            filler[0].unlink()
            resumed = _engine(table, splits, workdir)
            resumed.run(resume=True)
            identical = _history(workdir) == _history(reference_dir) and _same(resumed,
                                                                               reference)
            rows = _lut_disk_full(disk, table[0])
    except TmpfsUnavailable as exc:
        return {"skipped": f"needs root to mount a small tmpfs: {exc}"}
    return {"checkpoint_message": checkpoint, "checkpoint_resumed_identically": identical,
            "lut_message": rows.pop("message"), "rows_lost": rows}


def _lut_disk_full(disk: Path, pool: Any) -> dict[str, Any]:
    committed: list[str] = []

    class Spy(LutStore):
        def put(self, spec_or_key: Any, timing: Any, kind: str = "unit", **kw: Any) -> None:
            super().put(spec_or_key, timing, kind, **kw)
            if kind == "unit":
                committed.append(spec_or_key.key())

    path = disk / "full.sqlite"
    Spy.open(path, identity_for(pool.info, SESSION)).close()
    filler = fill(disk, leave_bytes=256 * 1024)
    message = "(no failure)"
    with Spy.open(path, identity_for(pool.info, SESSION)) as store:
        try:
            build_table(store, pool, plan_keys(small_network().planner, step=4).specs, SESSION,
                        policy=FAST, progress=False)
        except LutDiskFull as exc:
            message = str(exc)
    with LutStore.open(path, create=False) as store:
        lost = len(set(committed) - store.keys())
    filler.unlink()
    return {"message": message, "disk full while storing rows": lost}


def _lut_build_killed(folder: Path, address: str) -> dict[str, int]:
    """`lut build` SIGKILLed mid-build: every row it committed is there for the next build."""
    path = folder / "killed-build.sqlite"
    cmd = [sys.executable, "-m", "host.cli.netadapt_host", "lut", "build", "--device", address,
           "--model", "mobilenet_v1", "--step", "4", "--lut", str(path), "--calibrate", "0"]
    proc = subprocess.Popen(cmd, env=_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (not path.exists() or _rows(path) < 200) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen = _rows(path)  # rows a reader saw committed just before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    after = _rows(path)
    print(f"lut build SIGKILLed: {seen} rows seen committed before the kill, {after} after",
          flush=True)
    return {"lut build SIGKILLed": max(0, seen - after)}


def _rows(path: Path) -> int:
    try:
        with LutStore.open(path, create=False, check=False) as store:
            return store.count("unit")
    except Exception:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/reliability.json"))
    parser.add_argument("--kill-trials", type=int, default=3,
                        help="rounds of killed clients (unary, stream, queued each)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as tmp:
        folder = Path(tmp)
        (folder / "daemon").mkdir()
        with deployed_daemon(folder / "daemon") as address:
            result["bad_inputs"] = bench_bad_inputs(address)
            print(f"bad inputs: {result['bad_inputs']['as_expected']} of "
                  f"{result['bad_inputs']['total']} as expected", flush=True)
            result["hostile_models"] = bench_hostile_models(address)
            print(f"hostile models: {result['hostile_models']['refused']} of "
                  f"{result['hostile_models']['tried']} refused", flush=True)
            result["killed_clients"] = bench_killed_clients(address, args.kill_trials)
            print(f"killed clients: worst wait {result['killed_clients']['worst_wait_s']} s",
                  flush=True)
        with start_local_daemon() as local:
            result["host_failures"] = bench_host_failures(folder, local.address)
        lost = result["host_failures"]["lut_rows_lost"]
        result["lut_rows_lost_total"] = sum(lost.values())
        print(f"host failures: rows lost {result['lut_rows_lost_total']}", flush=True)
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("lut_rows_lost_total", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
