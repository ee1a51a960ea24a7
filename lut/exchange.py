"""LUT export and import: CSV for people and spreadsheets, JSON for moving a LUT between hosts.

JSON (the exchange format):

    {"format": "netadapt-lut", "schema_version": 1, "identity": {...}, "exported_at": "...",
     "row_count": N, "rows": [{"kind": "unit", "key": "...", "median_ms": ..., ...}, ...]}

CSV: one row per measurement with the identity repeated in every row (device_fingerprint ...
batch_size columns), so the file describes itself and CSVs of several devices can be
concatenated for analysis. `samples_ms` and `provider_options` are JSON strings in their cells.

Both are written to a temporary file and renamed, so a reader never sees half an export. Import
checks the export's identity against the store's and refuses a different one (unless
`allow_mismatch`); it adds the rows in one transaction and reports how many were new.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from device_server.stats import TimingStats
from lut.errors import FieldDifference, LutConditionsMismatch, LutCorruptError, LutSchemaError
from lut.store import FORMAT_NAME, SCHEMA_VERSION, LutIdentity, LutRow, LutStore

__all__ = [
    "CSV_COLUMNS",
    "LutExport",
    "ImportReport",
    "export_csv",
    "export_json",
    "read_export",
    "import_file",
]

logger = logging.getLogger(__name__)

_TIMING_FIELDS = (
    "median_ms", "mean_ms", "std_ms", "p90_ms", "min_ms", "max_ms",
    "samples_count", "number", "warmup_runs", "session_create_ms",
)  # fmt: skip
# The robust figure and what interfered (schema 2): optional on import (older exports lack
# them); other_load and steal are -1 when the device could not read them.
_ROBUST_FIELDS = ("value_ms", "ci_low_ms", "ci_high_ms", "preempted_samples", "other_load",
                  "steal")
_ROBUST_DEFAULTS = {"value_ms": 0.0, "ci_low_ms": 0.0, "ci_high_ms": 0.0,
                    "preempted_samples": 0, "other_load": -1.0, "steal": -1.0}
_INT_FIELDS = frozenset({"samples_count", "number", "warmup_runs", "preempted_samples"})
_ROW_COLUMNS = ("kind", "op", "label", "macs", *_TIMING_FIELDS, *_ROBUST_FIELDS, "measured_at",
                "key", "samples_ms")
_IDENTITY_COLUMNS = (
    "device_fingerprint", "ort_version", "provider", "intra_op_threads", "graph_optimization",
    "provider_options", "pinned_cpus", "batch_size",
)  # fmt: skip
CSV_COLUMNS = (*_ROW_COLUMNS, *_IDENTITY_COLUMNS)
# Exports from before the pinned cores were a condition lack that column: read as unpinned.
_OPTIONAL_COLUMNS = frozenset({"pinned_cpus"})


@dataclass(frozen=True)
class LutExport:
    """The contents of an export file. `identity` is None for a CSV with no rows."""

    path: Path
    fmt: str  # "csv" | "json"
    identity: LutIdentity | None
    schema_version: int
    rows: list[LutRow]


@dataclass(frozen=True)
class ImportReport:
    """What `import_file` did."""

    path: Path
    fmt: str
    rows: int  # rows in the file
    new: int  # added
    skipped: int  # already in the store and kept
    replaced: int  # already in the store and overwritten (overwrite=True)
    differences: tuple[FieldDifference, ...] = ()  # identity fields that differed (allowed)

    def describe(self) -> str:
        text = f"{self.path}: {self.new} new, {self.skipped} already present"
        if self.replaced:
            text += f", {self.replaced} replaced"
        if self.differences:
            text += f" (other conditions: {', '.join(d.name for d in self.differences)})"
        return text


# -- export -------------------------------------------------------------------------------------
def _record(row: LutRow) -> dict[str, object]:
    """A row as a flat dict (JSON-ready; samples as a list)."""
    t = row.timing
    out: dict[str, object] = {"kind": row.kind, "op": row.op, "label": row.label, "macs": row.macs}
    out.update({name: getattr(t, name) for name in (*_TIMING_FIELDS, *_ROBUST_FIELDS)})
    out["measured_at"] = row.measured_at.astimezone(UTC).isoformat(timespec="microseconds")
    out["key"] = row.key
    out["samples_ms"] = list(t.samples_ms)
    return out


@contextmanager
def _atomic_text(path: Path) -> Iterator[IO[str]]:
    """A text file that appears at `path` only once fully written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def export_csv(store: LutStore, path: str | Path, *, kind: str | None = None) -> int:
    """Writes the rows (of `kind`, or all) as CSV; returns how many."""
    path = Path(path)
    ident = store.identity.to_dict()
    ident["provider_options"] = json.dumps(ident["provider_options"], sort_keys=True)
    ident["pinned_cpus"] = json.dumps(ident["pinned_cpus"])
    n = 0
    with _atomic_text(path) as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in store.all_rows(kind):
            rec = _record(row)
            rec["samples_ms"] = json.dumps(rec["samples_ms"]) if row.timing.samples_ms else ""
            writer.writerow({**rec, **ident})
            n += 1
    logger.info("exported %d rows of %s to %s", n, store.path, path)
    return n


def export_json(
    store: LutStore, path: str | Path, *, kind: str | None = None, indent: int | None = None
) -> int:
    """Writes identity, schema version and rows (of `kind`, or all) as JSON; returns how many
    rows. One row per line unless `indent` is given."""
    path = Path(path)
    rows = [_record(r) for r in store.all_rows(kind)]
    head = {
        "format": FORMAT_NAME,
        "schema_version": store.schema_version,
        "identity": store.identity.to_dict(),
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "row_count": len(rows),
    }
    with _atomic_text(path) as f:
        if indent is not None:
            json.dump({**head, "rows": rows}, f, indent=indent)
        else:  # compact yet diffable: the header, then one row per line
            f.write(json.dumps(head)[:-1] + ', "rows": [\n')
            f.write(",\n".join(json.dumps(r) for r in rows))
            f.write("\n]}\n")
    logger.info("exported %d rows of %s to %s", len(rows), store.path, path)
    return len(rows)


# -- import -------------------------------------------------------------------------------------
def _row_from_record(rec: dict[str, object], where: str) -> LutRow:
    """Parses one exported row; LutCorruptError names the place and the field on bad input."""
    name = "kind"
    try:
        kind, key = str(rec["kind"]), str(rec["key"])
        if not kind or not key:
            raise ValueError("empty kind or key")
        values: dict[str, float | int] = {}
        for name in (*_TIMING_FIELDS, *_ROBUST_FIELDS):
            optional = name in _ROBUST_DEFAULTS
            raw = rec.get(name) if optional else rec[name]
            if optional and raw in (None, ""):
                values[name] = _ROBUST_DEFAULTS[name]
                continue
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError(f"not a number: {raw!r}")
            values[name] = int(raw) if name in _INT_FIELDS else float(raw)
            lowest = _ROBUST_DEFAULTS.get(name, 0)  # -1: "unknown" for other_load and steal
            if not math.isfinite(values[name]) or values[name] < lowest:
                what = "non-negative number" if lowest == 0 else f"number >= {lowest}"
                raise ValueError(f"not a finite {what}: {raw!r}")
        name = "samples_ms"
        samples = rec.get("samples_ms") or []
        if isinstance(samples, str):
            samples = json.loads(samples)
        if not isinstance(samples, list):
            raise ValueError(f"not a list: {samples!r}")
        name = "measured_at"
        measured_at = datetime.fromisoformat(str(rec["measured_at"]))
        if measured_at.tzinfo is None:
            measured_at = measured_at.replace(tzinfo=UTC)
    except KeyError as exc:
        raise LutCorruptError(f"{where}: missing field {exc}") from None
    except (ValueError, TypeError) as exc:
        raise LutCorruptError(f"{where}: bad {name} ({exc})") from None
    timing = TimingStats(
        median_ms=float(values["median_ms"]),
        mean_ms=float(values["mean_ms"]),
        std_ms=float(values["std_ms"]),
        p90_ms=float(values["p90_ms"]),
        min_ms=float(values["min_ms"]),
        max_ms=float(values["max_ms"]),
        samples_count=int(values["samples_count"]),
        samples_ms=tuple(float(x) for x in samples),
        number=int(values["number"]),
        warmup_runs=int(values["warmup_runs"]),
        session_create_ms=float(values["session_create_ms"]),
        value_ms=float(values["value_ms"]),
        ci_low_ms=float(values["ci_low_ms"]),
        ci_high_ms=float(values["ci_high_ms"]),
        preempted_samples=int(values["preempted_samples"]),
        other_load=float(values["other_load"]),
        steal=float(values["steal"]),
    )
    return LutRow(key=key, kind=kind, timing=timing, measured_at=measured_at)


def _read_json(path: Path) -> LutExport:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LutCorruptError(f"{path} is not valid JSON ({exc}): not a LUT export") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise LutCorruptError(f"{path} is not a netadapt LUT export (format is not {FORMAT_NAME})")
    version = doc.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise LutCorruptError(f"{path}: bad schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise LutSchemaError(
            f"{path} was written by a newer netadapt (schema {version} > {SCHEMA_VERSION}); "
            f"upgrade netadapt"
        )
    try:
        identity = LutIdentity.from_dict(doc["identity"])
    except (KeyError, ValueError, TypeError) as exc:
        raise LutCorruptError(f"{path}: bad identity ({exc})") from None
    records = doc.get("rows")
    if not isinstance(records, list):
        raise LutCorruptError(f"{path}: 'rows' must be a list")
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise LutCorruptError(f"{path}: row {i} is not an object")
        rows.append(_row_from_record(rec, f"{path}: row {i}"))
    return LutExport(path, "json", identity, version, rows)


def _read_csv(path: Path) -> LutExport:
    identities: dict[LutIdentity, int] = {}
    rows = []
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            absent = [c for c in CSV_COLUMNS
                      if c not in (reader.fieldnames or ()) and c not in _OPTIONAL_COLUMNS]
            if absent:
                raise LutCorruptError(
                    f"{path}: missing CSV columns {', '.join(absent)}: not a netadapt LUT export"
                )
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                try:
                    ident: dict[str, Any] = {c: rec[c] for c in _IDENTITY_COLUMNS if c in rec}
                    ident["provider_options"] = json.loads(rec["provider_options"] or "{}")
                    ident["pinned_cpus"] = json.loads(rec.get("pinned_cpus") or "[]")
                    row_identity = LutIdentity.from_dict(ident)
                except (ValueError, TypeError) as exc:
                    raise LutCorruptError(f"{where}: bad identity columns ({exc})") from None
                identities[row_identity] = identities.get(row_identity, 0) + 1
                rows.append(_row_from_record(dict(rec), where))
    except UnicodeDecodeError as exc:
        raise LutCorruptError(f"{path} is not UTF-8 text ({exc}): not a LUT export") from None
    except csv.Error as exc:
        raise LutCorruptError(f"{path}: bad CSV ({exc})") from None
    if len(identities) > 1:
        found = "; ".join(f"{n} rows of {i.describe()}" for i, n in identities.items())
        raise LutCorruptError(
            f"{path} mixes measurements of several conditions ({found}); split it by identity "
            f"columns and import each into its own LUT"
        )
    identity = next(iter(identities), None)
    return LutExport(path, "csv", identity, SCHEMA_VERSION, rows)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".json"):
        return suffix[1:]
    with path.open("rb") as f:
        start = f.read(64).lstrip()
    return "json" if start.startswith(b"{") else "csv"


def read_export(path: str | Path) -> LutExport:
    """Reads a CSV or JSON export (by suffix, else by content).

    Raises:
        FileNotFoundError: no such file.
        LutCorruptError: not an export, or a row that does not parse (names the row).
        LutSchemaError: a JSON export of a newer schema.
    """
    path = Path(path)
    return _read_json(path) if _format_of(path) == "json" else _read_csv(path)


def import_file(
    path: str | Path,
    store: LutStore,
    *,
    allow_mismatch: bool = False,
    overwrite: bool = False,
) -> ImportReport:
    """Adds the rows of an export to `store` in one transaction.

    Rows already in the store (same kind and key) are kept, and counted as skipped, unless
    `overwrite`.

    Raises:
        LutConditionsMismatch: the export was measured under other conditions than the store's
            (unless `allow_mismatch`, which imports anyway with a logged warning).
        LutCorruptError, LutSchemaError: see `read_export`.
    """
    export = read_export(path)
    differences: tuple[FieldDifference, ...] = ()
    if export.identity is not None:
        differences = tuple(export.identity.differences(store.identity))
    if differences:
        error = LutConditionsMismatch(export.path, list(differences), "file", "store")
        if not allow_mismatch:
            raise error
        logger.warning("importing anyway (allow_mismatch): %s", error)
    counts = store.merge(export.rows, overwrite=overwrite)
    report = ImportReport(
        path=export.path,
        fmt=export.fmt,
        rows=len(export.rows),
        new=counts.new,
        skipped=counts.skipped,
        replaced=counts.replaced,
        differences=differences,
    )
    logger.info("imported into %s: %s", store.path, report.describe())
    return report
