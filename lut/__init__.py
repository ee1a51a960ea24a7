"""Lookup tables of layer latencies measured on a device.

`lut.store` keeps one SQLite file per LUT, tied to the conditions it was measured under;
`lut.exchange` exports and imports it as CSV or JSON; `lut.errors` holds what can go wrong.
"""

from lut.errors import (
    FieldDifference,
    LutConditionsMismatch,
    LutCorruptError,
    LutError,
    LutNotFoundError,
    LutSchemaError,
)
from lut.exchange import ImportReport, LutExport, export_csv, export_json, import_file, read_export
from lut.store import (
    DEFAULT_KIND,
    SCHEMA_VERSION,
    LutIdentity,
    LutRow,
    LutStore,
    MergeCounts,
    key_of,
)

__all__ = [
    "DEFAULT_KIND",
    "SCHEMA_VERSION",
    "FieldDifference",
    "ImportReport",
    "LutConditionsMismatch",
    "LutCorruptError",
    "LutError",
    "LutExport",
    "LutIdentity",
    "LutNotFoundError",
    "LutRow",
    "LutSchemaError",
    "LutStore",
    "MergeCounts",
    "export_csv",
    "export_json",
    "import_file",
    "key_of",
    "read_export",
]
