"""The daemon's log: plain text, one record per line, safe to read on a phone or grep.

Records carry strings a client chose (request ids, error details quoting a request) and lines
ONNX Runtime wrote with terminal colour codes. The formatter strips escape sequences and
control characters, and indents continuation lines (a traceback), so no text from outside can
colour a terminal or pass for a record of its own.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from device_server.worker import strip_escapes

__all__ = ["PlainFormatter", "configure_logging", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        lines = [strip_escapes(line) for line in text.splitlines()] or [""]
        return "\n  ".join(lines)


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Sends the daemon's records to `stream` (stderr) through `PlainFormatter`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(PlainFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
