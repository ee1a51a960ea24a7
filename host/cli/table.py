"""A small plain-text table formatter for command-line output (no dependencies)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table", "format_ms"]


def format_ms(value: float) -> str:
    """Milliseconds with about four significant figures: 12.35, 1.235, 0.1235, 0.001235."""
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.3f}"
    return f"{value:.4g}"


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    right_align: Sequence[bool] | None = None,
) -> str:
    """Columns padded to their widest cell, a rule under the header, two spaces between.

    `right_align[i]` right-aligns column i (numbers); by default a column is right-aligned when
    every non-empty cell in it is an int or float.
    """
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    for i, row in enumerate(cells):
        assert len(row) == len(headers), f"row {i} has {len(row)} cells, expected {len(headers)}"
    if right_align is None:
        right_align = [
            all(isinstance(r[i], int | float) for r in rows if r[i] is not None) and bool(rows)
            for i in range(len(headers))
        ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.rjust(w) if right else cell.ljust(w)
            for cell, w, right in zip(row, widths, right_align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])
