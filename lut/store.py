"""The lookup-table store: one SQLite file per LUT, mapping `LayerSpec.key()` to timing stats.

A LUT is valid only for the conditions it was measured under, so those conditions (plus the
batch size) are its identity: written into the file when it is created, and checked on every
open. Rows are committed one by one as measurements arrive, so a killed build loses at most the
row in flight, and several processes may write the same file at once (a busy timeout makes a
writer wait for another one's commit). A new file is built aside and hard-linked into place, so
no one ever opens a half-made LUT and concurrent creators cannot collide.

File layout (schema version 1, kept in `PRAGMA user_version`):

    lut_meta(name PRIMARY KEY, value)      format = "netadapt-lut", identity (JSON), created_at
    lut_rows(kind, key, ...)               PRIMARY KEY (kind, key); kind "unit" by default

Durability: WAL journal with `synchronous=NORMAL`. In WAL mode NORMAL never corrupts the file,
and a committed row survives any crash of the writing process (SIGKILL, OOM kill, Ctrl-C), which
is how LUT builds die; only an OS crash or power cut can roll back the last few commits, and the
builder's resume re-measures exactly the rows that are missing. FULL would add an fsync per row
for no gain that resume does not already give.

Reading never returns data the store cannot vouch for: random bytes, a truncated file, damaged
pages (`PRAGMA quick_check`), a foreign SQLite database, a newer schema or other conditions each
raise an error from `lut.errors` instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from device_server.spec import LayerSpec
from device_server.stats import Conditions, TimingStats, percentile, quantile_interval
from lut.errors import (
    FieldDifference,
    LutConditionsMismatch,
    LutCorruptError,
    LutError,
    LutNotFoundError,
    LutSchemaError,
)

__all__ = [
    "SCHEMA_VERSION",
    "FORMAT_NAME",
    "DEFAULT_KIND",
    "LutIdentity",
    "LutRow",
    "MergeCounts",
    "LutStore",
    "LutDiskFull",
    "register_migration",
    "key_of",
    "MODEL_KIND",
    "with_network_figure",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3  # bump together with a `register_migration(SCHEMA_VERSION - 1)` function
FORMAT_NAME = "netadapt-lut"
DEFAULT_KIND = "unit"  # one fusion unit; others: "overhead", "reference", "model"
# Whole-network rows (calibration, lut/calibration.py): their samples are the network's rounds, and
# since schema 3 their figure is the 10th percentile of those rounds with its 95% interval
# (host/device/whole_model.py). Frozen here with the schema: another figure is a new version.
MODEL_KIND = "model"
_NETWORK_QUANTILE = 0.1
_NETWORK_CONFIDENCE = 0.95

_SYNCHRONOUS = "NORMAL"  # see the module docstring for why not FULL
_DEFAULT_TIMEOUT_S = 30.0  # busy timeout: how long a writer waits for another one's commit
_PAGE_ROWS = 512  # rows per query page when iterating
_SQLITE_MAGIC = b"SQLite format 3\x00"


# -- identity -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LutIdentity:
    """What a LUT is valid for: the measurement `Conditions` plus the batch size (composed, so a
    condition added to `Conditions` is part of every table's identity without a copy here).

    `provider_options` is normalised to sorted (name, value) string pairs, so the order in which
    options were given does not change the identity. The flat dict form (`to_dict`, what table
    files and exports hold) names the conditions' fields and `batch_size` side by side.
    """

    conditions: Conditions
    batch_size: int = 1

    def __post_init__(self) -> None:
        c = self.conditions
        options = tuple(sorted((str(k), str(v)) for k, v in c.provider_options))
        object.__setattr__(self, "conditions", dataclasses.replace(
            c, provider_options=options, intra_op_threads=int(c.intra_op_threads),
            pinned_cpus=tuple(sorted(int(cpu) for cpu in c.pinned_cpus))))
        object.__setattr__(self, "batch_size", int(self.batch_size))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def _flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {f.name: getattr(self.conditions, f.name)
                               for f in fields(Conditions)}
        out["batch_size"] = self.batch_size
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form, flat; provider options become an object."""
        out: dict[str, object] = self._flat()
        out["provider_options"] = dict(self.conditions.provider_options)
        out["pinned_cpus"] = list(self.conditions.pinned_cpus)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LutIdentity:
        """Inverse of `to_dict`.

        Raises:
            ValueError: a field is missing, unknown or of the wrong type.
        """
        names = {f.name for f in fields(Conditions)} | {"batch_size"}
        missing = sorted(names - set(d) - {"provider_options", "batch_size", "pinned_cpus"})
        unknown = sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"identity fields missing: {missing}, unknown: {unknown}")
        options = d.get("provider_options", {})
        if isinstance(options, dict):
            pairs = tuple((str(k), str(v)) for k, v in options.items())
        elif isinstance(options, list | tuple):
            pairs = tuple((str(p[0]), str(p[1])) for p in options)
        else:
            raise ValueError(f"provider_options must be an object, got {options!r}")
        for name in ("intra_op_threads", "batch_size"):
            value = d.get(name, 1)
            if not isinstance(value, int | str) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        conditions = Conditions(
            device_fingerprint=str(d["device_fingerprint"]),
            ort_version=str(d["ort_version"]),
            provider=str(d["provider"]),
            intra_op_threads=int(d["intra_op_threads"]),
            graph_optimization=str(d["graph_optimization"]),
            provider_options=pairs,
            # Tables from before pinning was a condition were measured unpinned or not at all.
            pinned_cpus=tuple(int(c) for c in d.get("pinned_cpus") or ()),
        )
        return cls(conditions=conditions, batch_size=int(d.get("batch_size", 1)))

    def differences(self, requested: LutIdentity) -> list[FieldDifference]:
        """Fields where `requested` differs from this (the table's) identity, in field order
        (the conditions' fields, then the batch size)."""
        out = []
        theirs_all = requested._flat()
        for name, ours in self._flat().items():
            theirs = theirs_all[name]
            if ours != theirs:
                if name == "provider_options":
                    ours, theirs = dict(ours), dict(theirs)
                out.append(FieldDifference(name, ours, theirs))
        return out

    def describe(self) -> str:
        c = self.conditions
        threads = c.intra_op_threads or "default"
        return (
            f"{c.device_fingerprint} ort {c.ort_version} {c.provider} "
            f"threads={threads} opt={c.graph_optimization} batch={self.batch_size}"
            + (f" cpus={','.join(map(str, c.pinned_cpus))}" if c.pinned_cpus else "")
        )


# -- rows ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LutRow:
    """One stored measurement. `op`, `label` and `macs` are derived from the key when it is a
    `LayerSpec` key (None otherwise), for people reading the table or its exports."""

    key: str
    kind: str
    timing: TimingStats
    measured_at: datetime
    op: str | None = None
    label: str | None = None
    macs: int | None = None

    @property
    def spec(self) -> LayerSpec | None:
        """The fusion unit this row measured, or None when the key is not a LayerSpec key."""
        return _parse_key(self.key)


@dataclass(frozen=True)
class MergeCounts:
    """What `LutStore.merge` did with the rows it was given."""

    new: int = 0
    skipped: int = 0  # already present and kept
    replaced: int = 0  # already present and overwritten


def key_of(spec_or_key: LayerSpec | str) -> str:
    """The row key of a spec (its canonical `key()`), or a key given as is."""
    if isinstance(spec_or_key, LayerSpec):
        return spec_or_key.key()
    if isinstance(spec_or_key, str) and spec_or_key:
        return spec_or_key
    raise TypeError(f"a LUT key is a LayerSpec or a non-empty str, got {spec_or_key!r}")


@functools.lru_cache(maxsize=8192)
def _parse_key(key: str) -> LayerSpec | None:
    if not key.startswith("{"):
        return None
    try:
        d = json.loads(key)
        return LayerSpec.from_dict(d) if isinstance(d, dict) else None
    except (ValueError, TypeError):
        return None


def _derived(spec: LayerSpec | None) -> tuple[str | None, str | None, int | None]:
    if spec is None:
        return None, None, None
    return spec.op.value, spec.describe(), spec.macs()


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    return kind


def _check_timing(key: str, timing: TimingStats) -> None:
    if not isinstance(timing, TimingStats):
        raise TypeError(f"timing for {key} must be TimingStats, got {type(timing).__name__}")
    values = (
        timing.median_ms,
        timing.mean_ms,
        timing.std_ms,
        timing.p90_ms,
        timing.min_ms,
        timing.max_ms,
        timing.session_create_ms,
        *timing.samples_ms,
    )
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"timing for {key} has negative or non-finite values: {timing}")


def _network_figure(rounds_ms: Sequence[float]) -> tuple[float, float, float]:
    """(figure, interval low, high) of a whole network's rounds, as schema 3 defines it."""
    ordered = sorted(float(x) for x in rounds_ms)
    low, high = quantile_interval(ordered, _NETWORK_QUANTILE, _NETWORK_CONFIDENCE)
    return percentile(ordered, _NETWORK_QUANTILE), low, high


def with_network_figure(row: LutRow) -> LutRow:
    """`row` with a whole-network row's figure and interval recomputed from its stored rounds.

    Robust whole-network rows written before 2026-12-01 held the median of their rounds; a
    table fitted on a mix of the two would carry a bias of a few percent. Returned unchanged:
    rows of another kind, whole-network rows without their rounds, and rows from before the
    robust protocol (no robust figure, `value_ms` 0: their samples are three per-pass medians,
    not rounds, and they are read by their median). A row already of schema 3 comes back equal.
    """
    if row.kind != MODEL_KIND or not row.timing.samples_ms or row.timing.value_ms <= 0:
        return row
    value, low, high = _network_figure(row.timing.samples_ms)
    timing = dataclasses.replace(row.timing, value_ms=value, ci_low_ms=low, ci_high_ms=high)
    return dataclasses.replace(row, timing=timing)


def _utc_text(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="microseconds")


_COLUMNS = (
    "kind", "key", "op", "label", "macs",
    "median_ms", "mean_ms", "std_ms", "p90_ms", "min_ms", "max_ms",
    "n", "number", "warmup_runs", "session_create_ms", "samples_json", "measured_at",
    "value_ms", "ci_low_ms", "ci_high_ms", "preempted_samples", "other_load", "steal",
)  # fmt: skip
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM lut_rows"
_UPSERT = (
    f"INSERT OR REPLACE INTO lut_rows ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_COLUMNS))})"
)

_Values = tuple[object, ...]


def _row_values(row: LutRow) -> _Values:
    t = row.timing
    samples = json.dumps(list(t.samples_ms)) if t.samples_ms else None
    op, label, macs = _derived(_parse_key(row.key))
    return (
        row.kind, row.key, op, label, macs,
        t.median_ms, t.mean_ms, t.std_ms, t.p90_ms, t.min_ms, t.max_ms,
        t.samples_count, t.number, t.warmup_runs, t.session_create_ms, samples,
        _utc_text(row.measured_at),
        t.value_ms, t.ci_low_ms, t.ci_high_ms, t.preempted_samples, t.other_load, t.steal,
    )  # fmt: skip


def _row_from_db(r: tuple[Any, ...]) -> LutRow:
    (kind, key, op, label, macs, median, mean, std, p90, lo, hi, n, number, warmup, create,
     samples, measured_at, value, ci_low, ci_high, preempted, other_load, steal) = r  # fmt: skip
    timing = TimingStats(
        median_ms=float(median),
        mean_ms=float(mean),
        std_ms=float(std),
        p90_ms=float(p90),
        min_ms=float(lo),
        max_ms=float(hi),
        samples_count=int(n),
        samples_ms=tuple(json.loads(samples)) if samples else (),
        number=int(number),
        warmup_runs=int(warmup),
        session_create_ms=float(create),
        value_ms=float(value or 0.0),
        ci_low_ms=float(ci_low or 0.0),
        ci_high_ms=float(ci_high or 0.0),
        preempted_samples=int(preempted or 0),
        other_load=-1.0 if other_load is None else float(other_load),
        steal=-1.0 if steal is None else float(steal),
    )
    return LutRow(
        key=str(key),
        kind=str(kind),
        timing=timing,
        measured_at=datetime.fromisoformat(str(measured_at)),
        op=None if op is None else str(op),
        label=None if label is None else str(label),
        macs=None if macs is None else int(macs),
    )


# -- schema and migrations ----------------------------------------------------------------------
Migration = Callable[[sqlite3.Connection], None]
_MIGRATIONS: dict[int, Migration] = {}  # from_version -> upgrades a file to from_version + 1


def register_migration(from_version: int) -> Callable[[Migration], Migration]:
    """Registers the function that upgrades a file from `from_version` to `from_version + 1`.

    It runs inside the open transaction (plain `conn.execute`, never `executescript`, which
    commits); the store sets `user_version` after it. Example for version 2:

        @register_migration(1)
        def _v1_to_v2(conn: sqlite3.Connection) -> None:
            conn.execute("ALTER TABLE lut_rows ADD COLUMN energy_mj REAL")
    """

    def decorate(fn: Migration) -> Migration:
        if from_version in _MIGRATIONS:
            raise ValueError(f"a migration from schema {from_version} is already registered")
        _MIGRATIONS[from_version] = fn
        return fn

    return decorate


# Version 1, frozen: new files are created as version 1 and brought up to SCHEMA_VERSION by the
# registered migrations, so every file, old or new, goes through the same path.
_SCHEMA_V1 = (
    """CREATE TABLE lut_meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE lut_rows (
        kind              TEXT NOT NULL DEFAULT 'unit',
        key               TEXT NOT NULL,
        op                TEXT,
        label             TEXT,
        macs              INTEGER,
        median_ms         REAL NOT NULL CHECK (median_ms >= 0),
        mean_ms           REAL NOT NULL,
        std_ms            REAL NOT NULL,
        p90_ms            REAL NOT NULL,
        min_ms            REAL NOT NULL,
        max_ms            REAL NOT NULL,
        n                 INTEGER NOT NULL,
        number            INTEGER NOT NULL DEFAULT 1,
        warmup_runs       INTEGER NOT NULL DEFAULT 0,
        session_create_ms REAL NOT NULL DEFAULT 0,
        samples_json      TEXT,
        measured_at       TEXT NOT NULL,
        PRIMARY KEY (kind, key)
    )""",
)



@register_migration(1)
def _v1_to_v2(conn: sqlite3.Connection) -> None:
    """The robust figure and its interval, and what interfered (issue: trustworthy latency).
    Rows measured before keep 0 / NULL and are read by their median."""
    for column in ("value_ms REAL NOT NULL DEFAULT 0", "ci_low_ms REAL NOT NULL DEFAULT 0",
                   "ci_high_ms REAL NOT NULL DEFAULT 0",
                   "preempted_samples INTEGER NOT NULL DEFAULT 0", "other_load REAL",
                   "steal REAL"):
        conn.execute(f"ALTER TABLE lut_rows ADD COLUMN {column}")


@register_migration(2)
def _v2_to_v3(conn: sqlite3.Connection) -> None:
    """Robust whole-network rows restated as the 10th percentile of their stored rounds (they
    held the median until 2026-12-01; see `with_network_figure`), so a table calibrated before
    then fits on the figure every check now takes. Rows without stored rounds, and rows from
    before the robust protocol (value_ms 0), keep theirs."""
    rows = conn.execute(
        "SELECT key, samples_json FROM lut_rows WHERE kind = ? AND samples_json IS NOT NULL "
        "AND value_ms > 0", (MODEL_KIND,)).fetchall()
    for key, samples in rows:
        rounds = json.loads(samples)
        if rounds:
            conn.execute("UPDATE lut_rows SET value_ms = ?, ci_low_ms = ?, ci_high_ms = ? "
                         "WHERE kind = ? AND key = ?",
                         (*_network_figure(rounds), MODEL_KIND, key))


def _table_names(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    return [str(r[0]) for r in rows]


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _set_user_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(f"PRAGMA user_version = {int(version)}")  # PRAGMA takes no parameters


class _Immediate:
    """`BEGIN IMMEDIATE ... COMMIT`, rolled back on error. IMMEDIATE takes the write lock up
    front (waiting up to the busy timeout), so a read-then-write transaction cannot fail with
    SQLITE_BUSY halfway when another process commits first."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc_type is None:
            self._conn.execute("COMMIT")
        elif self._conn.in_transaction:
            self._conn.execute("ROLLBACK")


def _upgrade(conn: sqlite3.Connection, source: Path, version: int) -> None:
    """Runs the registered migrations from `version` to SCHEMA_VERSION (caller holds the lock)."""
    for v in range(version, SCHEMA_VERSION):
        migration = _MIGRATIONS.get(v)
        if migration is None:
            raise LutSchemaError(
                f"{source}: no migration from schema {v} to {v + 1} (this netadapt reads "
                f"schema {SCHEMA_VERSION}); rebuild the LUT or report a bug"
            )
        logger.info("upgrading %s from schema %d to %d", source, v, v + 1)
        migration(conn)
        _set_user_version(conn, v + 1)


class LutDiskFull(LutError):
    """A row could not be written for lack of space; every row committed before is kept.
    `path` is the table."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


# -- file checks --------------------------------------------------------------------------------
def _check_file_layout(path: Path) -> None:
    """Rejects files SQLite would read without complaint yet wrongly.

    SQLite reads a file cut short inside its last page as if the missing bytes were zeros, and
    `quick_check` passes: so a file whose size is not a whole number of pages is refused here.
    A checkpoint in another process may be growing the file right now, so a bad size is looked
    at again (three times in 0.15 s) before it is called damaged.
    """
    size, page_size = 0, 0
    for attempt in range(3):
        if attempt:
            time.sleep(0.05 * attempt)
        size = path.stat().st_size
        if size == 0:
            return
        with path.open("rb") as f:
            header = f.read(100)
        if not _SQLITE_MAGIC.startswith(header[: len(_SQLITE_MAGIC)]):
            raise LutCorruptError(
                f"{path} is not a netadapt LUT (not an SQLite file: bad header); it is damaged "
                f"or something else: rebuild it or restore a backup"
            )
        if len(header) == 100:
            page_size = int.from_bytes(header[16:18], "big")
            page_size = 65536 if page_size == 1 else page_size
            valid = 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0
            if valid and size % page_size == 0:
                return
    raise LutCorruptError(
        f"{path} is truncated or damaged ({size} bytes is not a whole number of "
        f"{page_size or '?'}-byte pages): rebuild it or restore a backup"
    )


def _translate(exc: sqlite3.Error, path: Path, doing: str) -> LutError:
    """An sqlite3 error met while opening, as the LutError a user can act on."""
    name = str(getattr(exc, "sqlite_errorname", ""))
    if name.startswith("SQLITE_FULL"):
        return LutDiskFull(
            f"{path}: the disk is full while {doing} the table: free some space and run again",
            path)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return LutError(
            f"{path} stayed locked by another process while {doing} ({exc}); retry, or raise "
            f"the timeout"
        )
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT", "SQLITE_FORMAT")):
        return LutCorruptError(
            f"{path} is damaged or not a netadapt LUT ({exc}) while {doing}: rebuild it or "
            f"restore a backup"
        )
    return LutError(f"{path}: SQLite error while {doing}: {exc}")


# -- the store ----------------------------------------------------------------------------------
class LutStore:
    """One LUT file. Create or open with `LutStore.open`; safe to share between threads.

    Lookups by key default to kind "unit". `len(store)` counts rows of every kind.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        identity: LutIdentity,
        differences: tuple[FieldDifference, ...] = (),
    ) -> None:
        """Use `LutStore.open`; this takes an already checked connection."""
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.RLock()
        self.path = path
        self.identity = identity  # the table's own identity
        self.differences = differences  # fields where it differs from the requested one
        self.schema_version = SCHEMA_VERSION

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        identity: LutIdentity | None = None,
        *,
        create: bool = True,
        allow_mismatch: bool = False,
        check: bool = True,
        timeout_s: float = _DEFAULT_TIMEOUT_S,
    ) -> Self:
        """Opens the LUT at `path`, creating it (tagged with `identity`) when absent.

        Args:
            path: the SQLite file.
            identity: the conditions the caller needs. None accepts whatever the file holds
                (for tools that only read or export); creating a file needs one.
            create: create the file when it does not exist.
            allow_mismatch: open a file of another identity anyway, with a logged warning.
            check: run `PRAGMA quick_check` (reads the whole file; milliseconds for a LUT).
            timeout_s: how long to wait for another process's write lock.

        Raises:
            LutNotFoundError: no file and `create` is False.
            LutCorruptError: not a LUT, truncated or damaged.
            LutSchemaError: written by a newer netadapt.
            LutConditionsMismatch: measured under other conditions (names each field).
        """
        path = Path(path)
        if path.is_dir():
            raise LutCorruptError(f"{path} is a directory, not a LUT file")
        if not path.exists():
            if not create:
                raise LutNotFoundError(f"{path}: no such LUT; build it first")
            if identity is None:
                raise ValueError(f"creating {path} needs an identity (the measurement conditions)")
            try:
                _create_file(path, identity)
            except sqlite3.Error as exc:
                raise _translate(exc, path, "creating") from exc
        _check_file_layout(path)
        conn = sqlite3.connect(
            f"{path.resolve().as_uri()}?mode=rw",  # never creates: _create_file did that
            uri=True,
            timeout=timeout_s,
            isolation_level=None,  # autocommit: each put is its own transaction
            check_same_thread=False,  # guarded by the store's lock instead
        )
        try:
            table_identity = _prepare(conn, path, check)
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, path, "opening") from exc
        except BaseException:
            conn.close()
            raise
        differences: tuple[FieldDifference, ...] = ()
        if identity is not None:
            differences = tuple(table_identity.differences(identity))
        if differences:
            error = LutConditionsMismatch(path, list(differences))
            if not allow_mismatch:
                conn.close()
                raise error
            logger.warning("opening anyway (allow_mismatch): %s", error)
        logger.debug("opened %s (%s)", path, table_identity.describe())
        return cls(conn, path, table_identity, differences)

    # -- writing ------------------------------------------------------------------------------
    def put(
        self,
        spec_or_key: LayerSpec | str,
        timing: TimingStats,
        kind: str = DEFAULT_KIND,
        *,
        measured_at: datetime | None = None,
    ) -> None:
        """Stores (or replaces) one row and commits it before returning.

        Raises:
            ValueError: bad timing values, empty kind, or a spec of another batch size.
        """
        row = self._make_row(spec_or_key, timing, kind, measured_at)
        what = (f"the row of {spec_or_key.describe()}" if isinstance(spec_or_key, LayerSpec)
                else f"the {kind} row {row.key}")
        with self._lock, self._writing(what):
            self._connection().execute(_UPSERT, _row_values(row))

    def put_many(
        self,
        items: Iterable[tuple[LayerSpec | str, TimingStats]],
        kind: str = DEFAULT_KIND,
        *,
        measured_at: datetime | None = None,
    ) -> int:
        """Stores (or replaces) several rows in one transaction; returns how many."""
        values = [_row_values(self._make_row(s, t, kind, measured_at)) for s, t in items]
        with self._lock, self._writing(f"{len(values)} rows"), \
                _Immediate(self._connection()) as conn:
            conn.executemany(_UPSERT, values)
        return len(values)

    def merge(self, rows: Iterable[LutRow], *, overwrite: bool = False) -> MergeCounts:
        """Adds rows from elsewhere (an import) in one transaction, keeping their kind and
        timestamp. Rows already present are kept unless `overwrite`. Whole-network rows take
        this schema's figure from their rounds (`with_network_figure`): an export may be older."""
        incoming = [with_network_figure(row) for row in rows]
        for row in incoming:
            _check_kind(row.kind)
            _check_timing(row.key, row.timing)
        new = skipped = replaced = 0
        with self._lock, self._writing(f"{len(incoming)} imported rows"), \
                _Immediate(self._connection()) as conn:
            present = {(str(k), str(key)) for k, key in conn.execute(
                "SELECT kind, key FROM lut_rows")}  # fmt: skip
            to_write = []
            for row in incoming:
                ident = (row.kind, row.key)
                if ident in present:
                    if not overwrite:
                        skipped += 1
                        continue
                    replaced += 1
                else:
                    new += 1
                    present.add(ident)
                to_write.append(_row_values(row))
            conn.executemany(_UPSERT, to_write)
        return MergeCounts(new=new, skipped=skipped, replaced=replaced)

    # -- reading ------------------------------------------------------------------------------
    def get(self, spec_or_key: LayerSpec | str, kind: str = DEFAULT_KIND) -> TimingStats | None:
        row = self.get_row(spec_or_key, kind)
        return None if row is None else row.timing

    def get_row(self, spec_or_key: LayerSpec | str, kind: str = DEFAULT_KIND) -> LutRow | None:
        with self._lock:
            r = (
                self._connection()
                .execute(f"{_SELECT} WHERE kind = ? AND key = ?", (kind, key_of(spec_or_key)))
                .fetchone()
            )
        return None if r is None else _row_from_db(r)

    def __contains__(self, spec_or_key: object) -> bool:
        if not isinstance(spec_or_key, LayerSpec | str):
            return False
        with self._lock:
            r = (
                self._connection()
                .execute(
                    "SELECT 1 FROM lut_rows WHERE kind = ? AND key = ?",
                    (DEFAULT_KIND, key_of(spec_or_key)),
                )
                .fetchone()
            )
        return r is not None

    def keys(self, kind: str = DEFAULT_KIND) -> set[str]:
        with self._lock:
            rows = self._connection().execute("SELECT key FROM lut_rows WHERE kind = ?", (kind,))
            return {str(r[0]) for r in rows}

    def missing(self, keys: Iterable[LayerSpec | str], kind: str = DEFAULT_KIND) -> list[str]:
        """Keys (in the order given, without repeats) that have no row of `kind`: what a
        resumed build still has to measure."""
        present = self.keys(kind)
        out: list[str] = []
        for key in map(key_of, keys):
            if key not in present:
                present.add(key)
                out.append(key)
        return out

    def load_values(self, kind: str = DEFAULT_KIND) -> dict[str, float]:
        """key -> the robust figure (`TimingStats.robust_ms`: value_ms, or median_ms for rows
        measured before the robust protocol) of every row of `kind`, for fast estimates."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT key, CASE WHEN value_ms > 0 THEN value_ms ELSE median_ms END "
                "FROM lut_rows WHERE kind = ?", (kind,)
            )
            return {str(k): float(m) for k, m in rows}

    def all_rows(self, kind: str | None = None) -> Iterator[LutRow]:
        """Every row (of `kind`, or of all kinds), ordered by (kind, key).

        Reads page by page with no cursor held between pages, so the caller may write to the
        store while iterating (rows written meanwhile may or may not appear).
        """
        last = ("", "")
        while True:
            with self._lock:
                conn = self._connection()
                if kind is None:
                    page = conn.execute(
                        f"{_SELECT} WHERE (kind, key) > (?, ?) ORDER BY kind, key LIMIT ?",
                        (*last, _PAGE_ROWS),
                    ).fetchall()
                else:
                    page = conn.execute(
                        f"{_SELECT} WHERE kind = ? AND key > ? ORDER BY key LIMIT ?",
                        (kind, last[1], _PAGE_ROWS),
                    ).fetchall()
            for r in page:
                yield _row_from_db(r)
            if len(page) < _PAGE_ROWS:
                return
            last = (str(page[-1][0]), str(page[-1][1]))

    def kinds(self) -> dict[str, int]:
        """Row count per kind."""
        with self._lock:
            rows = self._connection().execute(
                "SELECT kind, COUNT(*) FROM lut_rows GROUP BY kind ORDER BY kind"
            )
            return {str(k): int(n) for k, n in rows}

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            conn = self._connection()
            if kind is None:
                r = conn.execute("SELECT COUNT(*) FROM lut_rows").fetchone()
            else:
                r = conn.execute("SELECT COUNT(*) FROM lut_rows WHERE kind = ?", (kind,)).fetchone()
            return int(r[0])

    def __len__(self) -> int:
        return self.count()

    # -- lifetime -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Closes the file (the last connection to close folds the WAL back into it)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"LutStore({str(self.path)!r}, {self.identity.describe()!r}, {state})"

    # -- helpers ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Turns SQLite's write failures into errors that say what was kept and what to do.
        A failed commit rolls back only itself: every row committed before stays."""
        try:
            yield
        except sqlite3.Error as exc:
            name = str(getattr(exc, "sqlite_errorname", ""))
            if not name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
                raise
            try:
                kept = f"the {self.count()} rows committed before are kept"
            except sqlite3.Error:
                kept = "every row committed before is kept"
            shown = what if len(what) <= 80 else what[:80] + "…"
            if name.startswith("SQLITE_FULL"):
                raise LutDiskFull(
                    f"{self.path}: the disk is full; could not store {shown} ({kept}): free "
                    f"some space and run the same command again (it measures only what is "
                    f"missing)", self.path) from exc
            raise LutError(
                f"{self.path}: the disk failed writing {shown} ({exc}; {kept}): check the "
                f"disk (space, quota, file size limit, read-only) and run again") from exc

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LutError(f"LUT {self.path} is closed")
        return self._conn

    def _make_row(
        self,
        spec_or_key: LayerSpec | str,
        timing: TimingStats,
        kind: str,
        measured_at: datetime | None,
    ) -> LutRow:
        key = key_of(spec_or_key)
        _check_kind(kind)
        _check_timing(key, timing)
        spec = spec_or_key if isinstance(spec_or_key, LayerSpec) else _parse_key(key)
        if spec is not None and spec.input_shape[0] != self.identity.batch_size:
            raise ValueError(
                f"{spec.describe()} has batch {spec.input_shape[0]} but this LUT is for batch "
                f"{self.identity.batch_size}"
            )
        return LutRow(key=key, kind=kind, timing=timing, measured_at=measured_at or _now())


def _now() -> datetime:
    return datetime.now(UTC)


def _prepare(conn: sqlite3.Connection, path: Path, check: bool) -> LutIdentity:
    """Checks an existing file behind a fresh connection; returns the table's identity."""
    tables = _table_names(conn)  # the first read: raises NOTADB for random bytes
    if not tables:
        raise LutCorruptError(f"{path} is empty, not a LUT: delete it, or pick another path")
    if "lut_meta" not in tables:
        raise LutCorruptError(
            f"{path} is an SQLite database but not a netadapt LUT (no lut_meta table; it has "
            f"{', '.join(tables)}): pick another path"
        )
    if check:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchmany(5)]
        if problems != ["ok"]:
            raise LutCorruptError(
                f"{path} is damaged ({'; '.join(problems)[:400]}): rebuild it or restore a backup"
            )
    # Files are created in WAL mode and it persists; switch only a file someone else changed.
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode != "wal":
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        if mode != "wal":
            logger.warning("%s: WAL unavailable (got %s); writers will wait longer", path, mode)
    conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS}")

    version = _user_version(conn)
    if version > SCHEMA_VERSION:
        raise LutSchemaError(
            f"{path} was written by a newer netadapt (schema {version} > {SCHEMA_VERSION}); "
            f"upgrade netadapt"
        )
    if version < 1:
        raise LutCorruptError(f"{path} has a lut_meta table but no schema version: not a LUT")
    if version < SCHEMA_VERSION:
        with _Immediate(conn):
            _upgrade(conn, path, _user_version(conn))  # re-read: another process may have done it

    meta = dict(conn.execute("SELECT name, value FROM lut_meta").fetchall())
    if meta.get("format") != FORMAT_NAME:
        raise LutCorruptError(f"{path}: lut_meta says format {meta.get('format')!r}, not a LUT")
    try:
        return LutIdentity.from_dict(json.loads(meta["identity"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise LutCorruptError(f"{path}: unreadable identity in lut_meta ({exc})") from exc


def _create_file(path: Path, identity: LutIdentity) -> None:
    """Builds a complete LUT beside `path` and links it into place, unless another process
    created `path` first.

    Creating in place would let two processes race on a fresh file: switching an empty file to
    WAL can fail with SQLITE_BUSY without waiting, and an opener could see it half set up. A
    hard link is atomic and never replaces an existing file, so exactly one creator wins and
    everyone else opens the winner's file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persistent: stored in the file header
            _initialise(conn, tmp, identity)
        finally:
            conn.close()  # folds the WAL into the file and removes it
        wal = Path(f"{tmp}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            # The fold failed (a full disk): the schema is only in the WAL, and linking the
            # bare file would leave a damaged table behind.
            raise LutDiskFull(
                f"{path}: the disk is full while creating the table: free some space and run "
                f"again", path)
        try:
            os.link(tmp, path)
        except FileExistsError:
            logger.debug("%s was created by another process first", path)
            return
        except OSError:  # a filesystem without hard links: a tiny race remains
            if path.exists():
                return
            os.replace(tmp, path)
        logger.info("created LUT %s for %s", path, identity.describe())
    finally:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            leftover.unlink(missing_ok=True)


def _initialise(conn: sqlite3.Connection, path: Path, identity: LutIdentity) -> None:
    """Creates the schema in an empty database, as version 1 then migrated to the current."""
    with _Immediate(conn):
        for statement in _SCHEMA_V1:
            conn.execute(statement)
        conn.executemany(
            "INSERT INTO lut_meta (name, value) VALUES (?, ?)",
            [
                ("format", FORMAT_NAME),
                ("identity", json.dumps(identity.to_dict(), sort_keys=True)),
                ("created_at", _utc_text(_now())),
            ],
        )
        _set_user_version(conn, 1)
        _upgrade(conn, path, 1)
