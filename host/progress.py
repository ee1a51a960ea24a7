"""Progress a person can follow anywhere: live bars on a terminal, and where stderr is a file,
a pipe, CI or a notebook cell, one plain line per event (an epoch, an iteration, every N keys
with the rate and the time left) instead of six silent minutes.

    progress = Progress.for_stderr(enabled=not args.json)
    with progress.bar(total=2000, desc="lut build", unit="key") as bar:
        for ...: bar.update(1)
    progress.event("iteration 3: group 5 -> 48 channels, est 0.1421 ms, holdout 0.931")
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO

__all__ = ["Progress", "LineBar"]


@dataclass
class LineBar:
    """A bar for logs: a line when it starts, every `every_s` seconds, and when it ends."""

    total: int
    desc: str
    unit: str
    stream: TextIO
    every_s: float = 10.0
    n: int = 0
    postfix: str = ""
    _shown_n: int = -1   # the count of the last status line: close() does not repeat it
    _t0: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self._line(f"{self.desc}: {self.total} {self.unit}s to do")

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _status(self) -> str:
        elapsed = time.monotonic() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100 * self.n / self.total if self.total else 100.0
        eta = f", ETA {left:.0f} s" if self.n < self.total and rate > 0 else ""
        post = f"; {self.postfix}" if self.postfix else ""
        return (f"{self.desc}: {self.n}/{self.total} {self.unit}s ({pct:.0f}%), "
                f"{rate:.1f} {self.unit}s/s, {elapsed:.0f} s{eta}{post}")

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._shown_n = self.n
            self._line(self._status())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def write(self, text: str) -> None:
        self._line(text)

    def close(self) -> None:
        if self.n != self._shown_n:
            self._line(self._status())

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class Progress:
    """Where progress goes. `tty` picks bars (tqdm) or lines; `enabled=False` is silent."""

    stream: TextIO
    tty: bool
    enabled: bool = True
    every_s: float = 10.0

    @classmethod
    def for_stderr(cls, enabled: bool = True, every_s: float = 10.0) -> Progress:
        return cls(sys.stderr, sys.stderr.isatty(), enabled, every_s)

    @classmethod
    def silent(cls) -> Progress:
        return cls(sys.stderr, False, enabled=False)

    def bar(self, total: int, desc: str, unit: str = "it", leave: bool = False) -> Any:
        """A tqdm bar on a terminal, a `LineBar` elsewhere, a disabled tqdm when silent."""
        from tqdm import tqdm

        if not self.enabled:
            return tqdm(total=total, disable=True)
        if self.tty:
            return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                        file=self.stream)
        return LineBar(total, desc, unit, self.stream, self.every_s)

    def event(self, text: str) -> None:
        """One line: above the bars on a terminal, plain elsewhere."""
        if not self.enabled:
            return
        if self.tty:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
