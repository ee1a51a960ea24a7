"""Errors of the lookup-table store, each with a message a user can act on.

The store never returns data it cannot vouch for: a file that is not a LUT, is damaged, was
written by a newer netadapt or was measured under other conditions raises one of these instead.
All derive from `LutError`, so a CLI can turn any of them into a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LutError",
    "LutNotFoundError",
    "LutCorruptError",
    "LutSchemaError",
    "FieldDifference",
    "LutConditionsMismatch",
]


class LutError(Exception):
    """Base class of every lookup-table error."""


class LutNotFoundError(LutError, FileNotFoundError):
    """The LUT file does not exist and the caller asked not to create it."""


class LutCorruptError(LutError):
    """The file is not a readable netadapt LUT: random bytes, truncated, damaged pages, a foreign
    SQLite database, or an export file that does not parse."""


class LutSchemaError(LutError):
    """The file's schema version cannot be used by this netadapt (newer, or no migration)."""


@dataclass(frozen=True)
class FieldDifference:
    """One identity field whose value in the table differs from the requested one."""

    name: str
    table: object
    requested: object

    def describe(self, table_label: str = "table", requested_label: str = "requested") -> str:
        return f"{self.name}: {table_label} {self.table!r}, {requested_label} {self.requested!r}"


class LutConditionsMismatch(LutError):
    """The LUT was measured under other conditions (device, runtime, threads, batch) than asked.

    Attributes:
        source: the file (or export) whose identity differs.
        differences: each differing field with the table's and the requested value.

    `table_label` / `requested_label` name the two sides in the message ("file" / "store" when
    an export is imported).
    """

    def __init__(
        self,
        source: str | Path,
        differences: list[FieldDifference],
        table_label: str = "table",
        requested_label: str = "requested",
    ) -> None:
        self.source = str(source)
        self.differences = tuple(differences)
        detail = "; ".join(d.describe(table_label, requested_label) for d in self.differences)
        super().__init__(
            f"{self.source} was measured under other conditions: {detail}. Use a LUT built for "
            f"these conditions, or pass allow_mismatch=True to use it anyway"
        )
