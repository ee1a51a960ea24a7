"""ONNX Runtime in a child process, so that a crash inside it — a segfault in a kernel, an
abort, the kernel's OOM killer — costs one measurement, not the daemon.

The daemon (parent) sends one job at a time over a socket pair; the worker keeps the LRU cache
of prepared sessions, asks for a graph's bytes only when it has no session for it, times the
session and sends back the timing. When the worker dies or hangs past the job's time budget,
the parent answers that job with `WorkerCrashed` (gRPC INTERNAL, naming the signal), starts a
fresh worker and goes on serving.

A plain subprocess (`python -m device_server.worker FD`) rather than `multiprocessing`: nothing
to re-import from the daemon's `__main__`, no semaphores (Android has no `sem_open`).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from device_server.errors import InvalidConfigError, MeasurementError
from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import TimingStats

__all__ = ["MeasureWorker", "WorkerCrashed", "Job"]

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0


class WorkerCrashed(MeasurementError):
    """The measurement killed or hung the worker process; the daemon restarted it."""

    code = "INTERNAL"


@dataclass(frozen=True)
class Job:
    key: tuple[str, ...]                          # session cache key (graph + options)
    session: SessionSpec
    policy: MeasurePolicy
    cap_s: float                                  # the daemon's cap on one measurement
    deadline_in_s: float | None                   # the client's deadline, seconds from now
    input_shapes: dict[str, tuple[int, ...]] | None = None


# -- the worker side --------------------------------------------------------------------------
def _serve(conn: Connection, cache_size: int) -> None:
    from device_server.timer import PreparedSession, TimeBudget, create_session, time_callable

    sessions: collections.OrderedDict[tuple[str, ...], PreparedSession] = (
        collections.OrderedDict())
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the daemon went away
            return
        if message[0] == "exit":
            return
        job: Job = message[1]
        try:
            prepared = sessions.get(job.key)
            created = prepared is None
            if prepared is None:
                conn.send(("need_model",))
                _, blob = conn.recv()
                if blob is None:  # the daemon could not produce the graph; it raises itself
                    conn.send(("error", InvalidConfigError("no model bytes")))
                    continue
                try:
                    prepared = create_session(blob, job.session, job.input_shapes)
                except InvalidConfigError:
                    raise
                except Exception as exc:
                    raise InvalidConfigError(f"cannot prepare the session: {exc}") from exc
                sessions[job.key] = prepared
                while len(sessions) > cache_size:
                    sessions.popitem(last=False)
            sessions.move_to_end(job.key)
            deadline = None if job.deadline_in_s is None else time.monotonic() + job.deadline_in_s
            timing = time_callable(prepared.run, job.policy, TimeBudget(job.cap_s, deadline),
                                   create_ms=prepared.create_ms if created else 0.0)
            conn.send(("ok", timing))
        except MeasurementError as exc:
            conn.send(("error", exc))
        except Exception as exc:  # keep serving; the daemon reports it as INTERNAL
            conn.send(("error", MeasurementError(f"{type(exc).__name__}: {exc}")))


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    conn = Connection(int(args[0]))
    _serve(conn, int(args[1]))
    return 0


# -- the daemon side --------------------------------------------------------------------------
def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class MeasureWorker:
    """The daemon's handle on its worker process. One job at a time (the device queue already
    serialises measurements; the lock makes it true for any caller)."""

    def __init__(self, cache_size: int = 64, hang_grace_s: float = 30.0) -> None:
        """`hang_grace_s`: time beyond a job's budget (which the worker enforces itself between
        phases) for session creation, which the budget does not bound, before a hang is
        declared and the worker killed."""
        self.cache_size = cache_size
        self.hang_grace_s = hang_grace_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "device_server.worker", str(theirs.fileno()),
                 str(self.cache_size)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        if not self._conn.poll(_START_TIMEOUT_S):
            self._kill()
            raise RuntimeError("the measurement worker did not start within "
                               f"{_START_TIMEOUT_S:.0f} s")
        try:
            self._conn.recv()  # ("ready", pid)
        except EOFError:
            code = self._proc.wait()
            raise RuntimeError(f"the measurement worker {_describe_exit(code)} at start") \
                from None
        log.debug("measurement worker pid %d ready", self._proc.pid)

    def _kill(self) -> int | None:
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            code = self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None
        return code

    def _recv(self, timeout_s: float, what: str) -> Any:
        assert self._conn is not None
        try:
            if self._conn.poll(timeout_s):
                return self._conn.recv()
            hang = f"did not finish within {timeout_s:.0f} s and was killed"
        except (EOFError, OSError):
            hang = None
        raise self._restart(what, hang)

    def _restart(self, what: str, reason: str | None = None) -> WorkerCrashed:
        code = self._kill()
        self.restarts += 1
        message = (f"the measurement worker {reason or _describe_exit(code)} while measuring "
                   f"{what}; the daemon restarted it (this config may crash ONNX Runtime on "
                   f"this device)")
        log.error(message)
        self._start()
        return WorkerCrashed(message)

    def measure(self, job: Job, model_bytes: Callable[[], bytes], what: str) -> TimingStats:
        """Times `job` in the worker; `model_bytes` is called only if the worker lacks the
        session. `what` names the config in a crash message.

        Raises:
            MeasurementError: what the measurement raised (bad model, over the cap, deadline).
            WorkerCrashed: the worker died or hung; a fresh one is already running.
        """
        budget_s = job.cap_s if job.deadline_in_s is None else min(job.cap_s, job.deadline_in_s)
        timeout_s = max(budget_s, 0.0) + self.hang_grace_s
        with self._lock:
            if self._conn is None:
                self._start()
            assert self._conn is not None
            try:
                self._conn.send(("measure", job))
                reply = self._recv(timeout_s, what)
                if reply[0] == "need_model":
                    try:
                        blob: bytes | None = model_bytes()
                    except BaseException:
                        self._conn.send(("model", None))  # keep the conversation in step
                        self._recv(timeout_s, what)
                        raise
                    self._conn.send(("model", blob))
                    reply = self._recv(timeout_s, what)
            except OSError:  # the worker was gone before we wrote (broken pipe)
                raise self._restart(what) from None
        if reply[0] == "error":
            raise reply[1]
        return reply[1]  # type: ignore[no-any-return]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.send(("exit",))
                except OSError:
                    pass
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()


if __name__ == "__main__":
    sys.exit(main())
