"""The LUT store on real SQLite files: identity checks, damaged and foreign files, schema
versions, two writer processes, a writer killed mid-build, and CSV / JSON export and import."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np
import pytest

import lut.store as store_module
from device_server.spec import LayerSpec
from device_server.stats import Conditions, TimingStats, summarize
from lut import (
    LutConditionsMismatch,
    LutCorruptError,
    LutError,
    LutIdentity,
    LutNotFoundError,
    LutSchemaError,
    LutStore,
    export_csv,
    export_json,
    import_file,
)
from lut.store import MODEL_KIND, SCHEMA_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]

CONDITIONS = Conditions(
    device_fingerprint="test-device-1",
    ort_version="1.20.0",
    provider="CPUExecutionProvider",
    intra_op_threads=1,
    graph_optimization="enable_all",
)
IDENT = LutIdentity(conditions=CONDITIONS)


def _with(**conditions: object) -> LutIdentity:
    """IDENT under other conditions."""
    return LutIdentity(conditions=dataclasses.replace(CONDITIONS, **conditions))


def spec(i: int, batch: int = 1) -> LayerSpec:
    """A distinct small conv per i."""
    return LayerSpec.create("conv2d", (batch, 8, 8, 8), out_channels=i + 1, kernel=3, padding=1)


def timing(i: int, keep_samples: bool = True) -> TimingStats:
    base = 0.5 + i / 100
    return summarize(
        [base, base * 1.1, base * 0.95, base * 1.3], number=4, warmup_runs=3,
        keep_samples=keep_samples,
    )  # fmt: skip


def fill(path: Path, n: int) -> None:
    with LutStore.open(path, IDENT) as store:
        store.put_many((spec(i), timing(i)) for i in range(n))


# -- round trip -----------------------------------------------------------------------------------
def test_create_reopen_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"
    with LutStore.open(path, IDENT) as store:
        store.put(spec(0), timing(0))
        store.put(spec(1).key(), timing(1, keep_samples=False))
        assert store.put_many([(spec(2), timing(2)), (spec(3), timing(3))]) == 2
        store.put("session", timing(9), kind="overhead")
        store.put(spec(0), timing(5))  # a re-measurement replaces the row

    with LutStore.open(path, IDENT, create=False) as store:
        assert store.identity == IDENT
        assert len(store) == 5 and store.count("unit") == 4
        assert store.kinds() == {"overhead": 1, "unit": 4}
        assert store.get(spec(0)) == timing(5)
        assert store.get(spec(1)) == timing(1, keep_samples=False)
        assert store.get(spec(7)) is None
        assert spec(2) in store and spec(7) not in store and "session" not in store
        assert store.get("session", kind="overhead") == timing(9)
        assert store.load_values() == {spec(i).key(): timing(j).robust_ms
                                        for i, j in ((0, 5), (1, 1), (2, 2), (3, 3))}  # fmt: skip
        row = store.get_row(spec(2))
        assert row is not None and row.spec == spec(2) and row.op == "conv2d"
        assert row.label == spec(2).describe() and row.macs == spec(2).macs()
        assert row.measured_at.tzinfo is not None
        rows = list(store.all_rows())
        assert [(r.kind, r.key) for r in rows] == sorted((r.kind, r.key) for r in rows)
        assert len(rows) == 5 and [r.kind for r in rows].count("unit") == 4


def test_all_rows_pages_across_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_PAGE_ROWS", 3)
    with LutStore.open(tmp_path / "lut.sqlite", IDENT) as store:
        store.put_many((spec(i), timing(i)) for i in range(7))
        store.put_many(((f"k{i}", timing(i)) for i in range(4)), kind="reference")
        assert len(list(store.all_rows())) == 11
        assert len(list(store.all_rows("unit"))) == 7
        assert [r.key for r in store.all_rows("reference")] == ["k0", "k1", "k2", "k3"]


def test_missing_is_ordered_set_difference(tmp_path: Path) -> None:
    with LutStore.open(tmp_path / "lut.sqlite", IDENT) as store:
        store.put_many((spec(i), timing(i)) for i in range(5))
        store.put(spec(8), timing(8), kind="overhead")  # another kind does not count
        wanted: list[LayerSpec | str] = [spec(3), spec(7), spec(5).key(), spec(7), spec(1), spec(8)]
        assert store.missing(wanted) == [spec(7).key(), spec(5).key(), spec(8).key()]
        assert store.missing([]) == []


def test_put_rejects_bad_rows(tmp_path: Path) -> None:
    with LutStore.open(tmp_path / "lut.sqlite", IDENT) as store:
        with pytest.raises(ValueError, match="non-finite"):
            store.put(spec(0), dataclasses.replace(timing(0), median_ms=math.nan))
        with pytest.raises(ValueError, match="batch 2 but this LUT is for batch 1"):
            store.put(spec(0, batch=2), timing(0))
        with pytest.raises(ValueError, match="kind"):
            store.put(spec(0), timing(0), kind="")
        assert len(store) == 0
    with pytest.raises(LutError, match="closed"):
        store.get(spec(0))


def test_identity_normalises_provider_options() -> None:
    a = _with(provider_options=(("b", "2"), ("a", "1")))
    b = _with(provider_options=(("a", "1"), ("b", "2")))
    assert a == b and LutIdentity.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    # The file's flat form: the conditions' fields and the batch size side by side.
    assert a.to_dict() == {"device_fingerprint": "test-device-1", "ort_version": "1.20.0",
                           "provider": "CPUExecutionProvider", "intra_op_threads": 1,
                           "graph_optimization": "enable_all",
                           "provider_options": {"a": "1", "b": "2"}, "pinned_cpus": [],
                           "batch_size": 1}
    assert LutIdentity(conditions=CONDITIONS, batch_size=4).conditions == CONDITIONS
    # A table from before the pinned cores were a condition opens as measured unpinned.
    old = {k: v for k, v in a.to_dict().items() if k != "pinned_cpus"}
    assert LutIdentity.from_dict(old) == a


def test_missing_file_not_created(tmp_path: Path) -> None:
    path = tmp_path / "absent.sqlite"
    with pytest.raises(LutNotFoundError):
        LutStore.open(path, IDENT, create=False)
    assert not path.exists()


# -- identity -------------------------------------------------------------------------------------
def test_other_conditions_refused_naming_fields(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 2)
    other = _with(intra_op_threads=2, device_fingerprint="pixel-7")
    with pytest.raises(LutConditionsMismatch) as info:
        LutStore.open(path, other)
    message = str(info.value)
    assert "intra_op_threads: table 1, requested 2" in message
    assert "device_fingerprint: table 'test-device-1', requested 'pixel-7'" in message
    assert "allow_mismatch" in message
    assert [d.name for d in info.value.differences] == ["device_fingerprint", "intra_op_threads"]


def test_allow_mismatch_opens_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 2)
    other = dataclasses.replace(IDENT, batch_size=8)
    with caplog.at_level(logging.WARNING, logger="lut.store"):
        with LutStore.open(path, other, allow_mismatch=True) as store:
            assert store.identity == IDENT  # the table's own identity
            assert [d.name for d in store.differences] == ["batch_size"]
            assert store.get(spec(1)) == timing(1)
    assert any("batch_size: table 1, requested 8" in r.getMessage() for r in caplog.records)


def test_open_without_identity_reads_the_files(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 1)
    with LutStore.open(path) as store:
        assert store.identity == IDENT and len(store) == 1
    with pytest.raises(ValueError, match="needs an identity"):
        LutStore.open(tmp_path / "new.sqlite")


# -- damaged and foreign files --------------------------------------------------------------------
@pytest.mark.parametrize("header", [b"", b"SQLite format 3\x00"], ids=["random", "sqlite-header"])
def test_random_bytes_refused_and_untouched(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "lut.sqlite"
    data = header + random.Random(0).randbytes(8192 - len(header))
    path.write_bytes(data)
    with pytest.raises(LutCorruptError, match=str(path)):
        LutStore.open(path, IDENT)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lut.sqlite"]


@pytest.mark.parametrize("cut", ["inside-last-page", "half-page-aligned", "inside-header"])
def test_truncated_file_refused(tmp_path: Path, cut: str) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 300)
    assert not Path(f"{path}-wal").exists(), "closing should fold the WAL into the file"
    data = path.read_bytes()
    page = int.from_bytes(data[16:18], "big")
    size = {
        "inside-last-page": len(data) - 100,  # SQLite itself would read this silently wrong
        "half-page-aligned": len(data) // 2 // page * page,
        "inside-header": 60,
    }[cut]
    path.write_bytes(data[:size])
    with pytest.raises(LutCorruptError, match="truncated|damaged"):
        LutStore.open(path, IDENT)


def test_foreign_sqlite_db_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.close()
    data = path.read_bytes()
    with pytest.raises(LutCorruptError, match="not a netadapt LUT.*users"):
        LutStore.open(path, IDENT)
    assert path.read_bytes() == data  # not even switched to WAL


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 1)
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    expected = f"newer netadapt \\(schema {SCHEMA_VERSION + 1} > {SCHEMA_VERSION}\\); upgrade"
    with pytest.raises(LutSchemaError, match=expected):
        LutStore.open(path, IDENT)


def test_registered_migration_upgrades_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lut.sqlite"
    fill(path, 3)
    calls: list[int] = []
    old, new = SCHEMA_VERSION, SCHEMA_VERSION + 1

    def upgrade(conn: sqlite3.Connection) -> None:
        calls.append(1)
        conn.execute("ALTER TABLE lut_rows ADD COLUMN energy_mj REAL")

    monkeypatch.setattr(store_module, "SCHEMA_VERSION", new)
    monkeypatch.setattr(store_module, "_MIGRATIONS", dict(store_module._MIGRATIONS))
    with pytest.raises(LutSchemaError, match=f"no migration from schema {old} to {new}"):
        LutStore.open(path, IDENT)
    store_module.register_migration(old)(upgrade)
    for _ in range(2):  # the second open finds it done
        with LutStore.open(path, IDENT) as store:
            assert store.schema_version == new and store.get(spec(2)) == timing(2)
    assert calls == [1]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == new
    conn.close()


def _back_to_schema_1(path: Path) -> None:
    """Turns a table into what a schema-1 file holds (no robust figure, no interference)."""
    with sqlite3.connect(path) as conn:
        for column in ("value_ms", "ci_low_ms", "ci_high_ms", "preempted_samples",
                       "other_load", "steal"):
            conn.execute(f"ALTER TABLE lut_rows DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_schema_1_rows_are_read_by_their_median(tmp_path: Path) -> None:
    """A table from before the robust protocol (schema 1) opens upgraded; its rows have no
    robust figure, so estimates read their medians."""
    path = tmp_path / "lut.sqlite"
    fill(path, 2)
    _back_to_schema_1(path)
    with LutStore.open(path, IDENT) as store:
        assert store.schema_version == SCHEMA_VERSION
        row = store.get(spec(1))
        assert row is not None and row.value_ms == 0 and row.robust_ms == row.median_ms
        assert store.load_values() == {spec(i).key(): timing(i).median_ms for i in range(2)}


# A whole network's rounds, two of them in a burst. Until schema 3 a whole-network row's figure
# was their median; now it is their 10th percentile, its 95% interval from the fastest round to
# the 3rd fastest of 6.
ROUNDS = (0.52, 0.50, 0.61, 0.55, 0.70, 0.51)


def _median_row_timing(rounds: tuple[float, ...] = ROUNDS) -> TimingStats:
    """What a schema-2 table holds for a network measured before 2026-12-01."""
    ordered = sorted(rounds)
    return dataclasses.replace(summarize(list(rounds)), value_ms=statistics.median(rounds),
                               ci_low_ms=ordered[1], ci_high_ms=ordered[4])


def _assert_figure_of_its_rounds(row: TimingStats, before: TimingStats) -> None:
    assert row.value_ms == pytest.approx(float(np.quantile(ROUNDS, 0.1)))
    assert (row.ci_low_ms, row.ci_high_ms) == (0.50, 0.52)
    assert dataclasses.replace(row, value_ms=before.value_ms, ci_low_ms=before.ci_low_ms,
                               ci_high_ms=before.ci_high_ms) == before  # nothing else moved


def test_schema_2_whole_network_rows_take_the_figure_of_their_rounds(tmp_path: Path) -> None:
    """A table calibrated before 2026-12-01 must not fit on a mix of medians and 10th
    percentiles: opening it restates every whole-network row from its stored rounds."""
    path = tmp_path / "lut.sqlite"
    old = _median_row_timing()
    no_rounds = dataclasses.replace(old, samples_ms=())
    with LutStore.open(path, IDENT) as store:
        store.put("net-a", old, kind=MODEL_KIND)
        store.put("net-b", no_rounds, kind=MODEL_KIND)
        store.put(spec(0), old)  # a unit's samples are calls, not rounds: left alone
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 2")
    conn.close()
    with LutStore.open(path, IDENT) as store:
        assert store.schema_version == SCHEMA_VERSION == 3
        a = store.get("net-a", kind=MODEL_KIND)
        assert a is not None and a.value_ms < old.value_ms
        _assert_figure_of_its_rounds(a, old)
        assert store.get("net-b", kind=MODEL_KIND) == no_rounds  # nothing to restate it from
        assert store.get(spec(0)) == old


def test_whole_network_rows_from_before_the_robust_protocol_stay_read_by_their_median(
    tmp_path: Path
) -> None:
    """Schema 1 stored three per-pass medians as a whole network's samples, with no robust
    figure: not rounds, so neither the upgrade nor an import restates them."""
    path = tmp_path / "lut.sqlite"
    legacy = dataclasses.replace(summarize([1.0, 1.1, 1.3]), value_ms=0.0, ci_low_ms=0.0,
                                 ci_high_ms=0.0)
    with LutStore.open(path, IDENT) as store:
        store.put("net-a", legacy, kind=MODEL_KIND)
        export_json(store, tmp_path / "lut.json")
    _back_to_schema_1(path)
    with LutStore.open(path, IDENT) as store:
        row = store.get("net-a", kind=MODEL_KIND)
        assert row is not None and row.value_ms == 0 and row.robust_ms == 1.1
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        import_file(tmp_path / "lut.json", b)
        assert b.get("net-a", kind=MODEL_KIND) == legacy


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_an_older_export_of_whole_network_rows_imports_with_the_figure_of_their_rounds(
    tmp_path: Path, fmt: str
) -> None:
    export = tmp_path / f"lut.{fmt}"
    old = _median_row_timing()
    with LutStore.open(tmp_path / "a.sqlite", IDENT) as a:
        a.put("net-a", old, kind=MODEL_KIND)
        a.put(spec(0), old)
        (export_csv if fmt == "csv" else export_json)(a, export)
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        assert import_file(export, b).new == 2
        a_row = b.get("net-a", kind=MODEL_KIND)
        assert a_row is not None
        _assert_figure_of_its_rounds(a_row, old)
        assert b.get(spec(0)) == old


# -- concurrency and crashes ----------------------------------------------------------------------
def _write_range(
    path: str,
    start: int,
    stop: int,
    ready: Barrier,
    spans: multiprocessing.Queue[tuple[float, float]],
) -> None:
    """Child process: once both children are up, create-or-open the same file as the other one,
    then put rows one by one; reports when its writes began and ended."""
    ready.wait(60)
    with LutStore.open(path, IDENT, timeout_s=30) as store:
        began = time.monotonic()
        for i in range(start, stop):
            store.put(spec(i), timing(i))
        spans.put((began, time.monotonic()))


def test_two_processes_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"  # does not exist yet: both processes race to create it
    ctx = multiprocessing.get_context("spawn")
    ready, spans = ctx.Barrier(2), ctx.Queue()
    ranges = [(0, 300), (150, 450)]  # 150 keys written by both
    procs = [
        ctx.Process(target=_write_range, args=(str(path), a, b, ready, spans)) for a, b in ranges
    ]
    for p in procs:
        p.start()
    (a0, a1), (b0, b1) = spans.get(timeout=120), spans.get(timeout=120)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert a0 < b1 and b0 < a1, "the two writers did not run at the same time"
    with LutStore.open(path, IDENT, create=False) as store:
        assert len(store) == 450
        assert store.missing(spec(i) for i in range(450)) == []
        assert store.get(spec(200)) == timing(200)
    assert [p.name for p in tmp_path.iterdir()] == ["lut.sqlite"]  # no temp file, WAL folded


def test_threads_share_one_store(tmp_path: Path) -> None:
    import threading

    with LutStore.open(tmp_path / "lut.sqlite", IDENT) as store:

        def work(offset: int) -> None:
            for i in range(offset, offset + 25):
                store.put(spec(i), timing(i))
                store.load_values()

        threads = [threading.Thread(target=work, args=(k * 25,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(store) == 100


_KILLED_WRITER = """
import sys
from lut.store import LutStore
from tests.test_lut_store import IDENT, spec, timing
with LutStore.open(sys.argv[1], IDENT) as store:
    i = 0
    while True:
        store.put(spec(i), timing(i))
        print(i, flush=True)
        i += 1
"""


def test_killed_writer_keeps_committed_rows(tmp_path: Path) -> None:
    path = tmp_path / "lut.sqlite"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path)],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    last = -1
    try:
        for line in child.stdout:
            last = int(line)
            if last >= 80:
                break
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    assert last >= 80, f"the writer stopped early (exit {child.returncode})"
    assert child.returncode == -signal.SIGKILL

    with LutStore.open(path, IDENT, create=False) as store:  # quick_check runs on open
        present = store.keys()
        assert spec(last).key() in present
        n = len(present)
        assert n > last  # every acknowledged row survived ...
        assert present == {spec(i).key() for i in range(n)}  # ... with no hole or stray row
        assert all(store.get(spec(i)) == timing(i) for i in range(0, n, 7))


# -- export and import ----------------------------------------------------------------------------
def _sample_store(path: Path) -> LutStore:
    store = LutStore.open(path, IDENT)
    store.put_many((spec(i), timing(i, keep_samples=i % 2 == 0)) for i in range(6))
    store.put("session", timing(3), kind="overhead")
    return store


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_import_round_trip(tmp_path: Path, fmt: str) -> None:
    export = tmp_path / f"lut.{fmt}"
    with _sample_store(tmp_path / "a.sqlite") as a:
        written = (export_csv if fmt == "csv" else export_json)(a, export)
        assert written == 7
        expected = list(a.all_rows())
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        b.put(spec(0), timing(50))  # already present: kept
        report = import_file(export, b)
        assert (report.fmt, report.rows, report.new, report.skipped) == (fmt, 7, 6, 1)
        assert b.get(spec(0)) == timing(50)
        again = import_file(export, b, overwrite=True)
        assert (again.new, again.skipped, again.replaced) == (0, 0, 7)
        assert list(b.all_rows()) == expected  # timings, kinds, timestamps and labels exact


def test_a_csv_export_from_before_pinned_cores_were_a_condition_imports(tmp_path: Path) -> None:
    import csv

    export = tmp_path / "new.csv"
    with _sample_store(tmp_path / "a.sqlite") as a:
        export_csv(a, export)
    with export.open(newline="") as f:
        records = list(csv.DictReader(f))
    assert {r["pinned_cpus"] for r in records} == {"[]"}
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as f:
        columns = [c for c in records[0] if c != "pinned_cpus"]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        assert import_file(old, b).new == 7


def test_json_export_carries_identity_and_version(tmp_path: Path) -> None:
    export = tmp_path / "lut.json"
    with _sample_store(tmp_path / "a.sqlite") as a:
        export_json(a, export)
    doc = json.loads(export.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION and doc["format"] == "netadapt-lut"
    assert LutIdentity.from_dict(doc["identity"]) == IDENT and doc["row_count"] == 7

    doc["schema_version"] = SCHEMA_VERSION + 1
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(doc))
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        with pytest.raises(LutSchemaError, match="upgrade netadapt"):
            import_file(newer, b)
        bad = tmp_path / "bad.json"
        bad.write_text('{"format": "something-else"}')
        with pytest.raises(LutCorruptError, match="not a netadapt LUT export"):
            import_file(bad, b)
        assert len(b) == 0


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_import_of_other_conditions_refused_unless_allowed(
    tmp_path: Path, fmt: str, caplog: pytest.LogCaptureFixture
) -> None:
    export = tmp_path / f"lut.{fmt}"
    with _sample_store(tmp_path / "a.sqlite") as a:
        (export_csv if fmt == "csv" else export_json)(a, export)
    other = _with(intra_op_threads=4)
    with LutStore.open(tmp_path / "b.sqlite", other) as b:
        with pytest.raises(LutConditionsMismatch, match="intra_op_threads: file 1, store 4"):
            import_file(export, b)
        assert len(b) == 0
        with caplog.at_level(logging.WARNING, logger="lut.exchange"):
            report = import_file(export, b, allow_mismatch=True)
        assert report.new == 7 and [d.name for d in report.differences] == ["intra_op_threads"]
        assert any("intra_op_threads" in r.getMessage() for r in caplog.records)


def test_csv_with_bad_cell_names_the_line(tmp_path: Path) -> None:
    export = tmp_path / "lut.csv"
    with _sample_store(tmp_path / "a.sqlite") as a:
        export_csv(a, export)
    with export.open(newline="") as f:
        records = list(csv.DictReader(f))
    records[1]["median_ms"] = "fast"  # the second data row: line 3
    with export.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with LutStore.open(tmp_path / "b.sqlite", IDENT) as b:
        with pytest.raises(LutCorruptError, match=r"lut\.csv:3: bad median_ms"):
            import_file(export, b)
        assert len(b) == 0
