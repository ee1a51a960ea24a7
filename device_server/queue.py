"""One measurement at a time: a FIFO lock over the device.

Two benchmarks running at once would disturb each other, so every measurement (session
creation included) holds the device. Waiters are served in arrival order; one that gives up
(deadline, cancelled call) leaves the line without blocking those behind it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from device_server.errors import DeadlineError, ResourceLimitError

__all__ = ["DeviceQueue", "Cancelled"]


class Cancelled(Exception):
    """The caller went away while waiting for the device."""


class DeviceQueue:
    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._cond = threading.Condition()
        self._line: collections.deque[object] = collections.deque()

    @property
    def depth(self) -> int:
        """Measurements running or waiting now."""
        with self._cond:
            return len(self._line)

    @contextmanager
    def hold(
        self,
        deadline: float | None = None,
        is_active: Callable[[], bool] | None = None,
    ) -> Iterator[None]:
        """Waits for the device, holds it for the body, releases it.

        Raises:
            ResourceLimitError: the queue is full.
            DeadlineError: the deadline (time.monotonic) passed while waiting.
            Cancelled: `is_active()` turned false while waiting.
        """
        me = object()
        with self._cond:
            if len(self._line) >= self.max_depth:
                raise ResourceLimitError(
                    f"the device queue is full ({len(self._line)} measurements running or "
                    f"waiting, limit {self.max_depth}); retry later"
                )
            self._line.append(me)
            try:
                while self._line[0] is not me:
                    self._cond.wait(timeout=0.05)
                    if deadline is not None and time.monotonic() > deadline:
                        raise DeadlineError(
                            "the client's deadline passed while waiting for the device queue"
                        )
                    if is_active is not None and not is_active():
                        raise Cancelled()
            except BaseException:
                self._line.remove(me)
                self._cond.notify_all()
                raise
        try:
            yield
        finally:
            with self._cond:
                self._line.popleft()
                self._cond.notify_all()
