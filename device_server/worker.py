"""ONNX Runtime in a child process, so that a crash inside it — a segfault in a kernel, an
abort, the kernel's OOM killer — costs one measurement, not the daemon.

The daemon (parent) sends one job at a time over a socket pair; the worker keeps the LRU cache
of prepared sessions, asks for a graph's bytes only when it has no session for it, times the
session and sends back the timing. When the worker dies or hangs past the job's time budget,
the parent answers that job with `WorkerCrashed` (gRPC INTERNAL, naming the signal), starts a
fresh worker and goes on serving.

A job nobody waits for any more (the client cancelled, its deadline passed, its stream closed)
is abandoned: the parent sends the worker SIGUSR1, which raises `Interrupted` in it at the next
Python instruction — between two timed runs, which last milliseconds — and the worker answers
"cancelled" and keeps its sessions. A worker still silent `cancel_grace_s` later (one run of
the runtime that lasts longer) is killed and restarted. Either way the device is free again
within a bound the caller knows.

The worker's stdout and stderr (ONNX Runtime's own log lines, with their terminal colour codes)
are read by the parent, stripped of escape sequences and logged one line each.

A plain subprocess (`python -m device_server.worker FD`) rather than `multiprocessing`: nothing
to re-import from the daemon's `__main__`, no semaphores (Android has no `sem_open`).
"""

from __future__ import annotations

import collections
import logging
import os
import re
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
from types import FrameType
from typing import IO, Any

from device_server.errors import InvalidConfigError, MeasurementError, describe_exit
from device_server.inputs import InputFeed
from device_server.spec import MeasurePolicy, SessionSpec
from device_server.stats import TimingStats

__all__ = ["MeasureWorker", "WorkerCrashed", "Job", "JobCancelled", "strip_escapes"]

log = logging.getLogger(__name__)
ort_log = logging.getLogger(f"{__name__}.onnxruntime")

_START_TIMEOUT_S = 60.0
_POLL_S = 0.05                      # how often a waiting daemon asks whether the client is gone
_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_ORT_LINE = re.compile(r"\[[VIWEF]:onnxruntime")


def strip_escapes(text: str) -> str:
    """`text` without ANSI/VT100 escape sequences (colours, cursor moves) or other control
    characters: what a log file should hold."""
    text = _ESCAPES.sub("", text)
    return "".join(ch for ch in text if ch >= " " or ch == "\t")


class WorkerCrashed(MeasurementError):
    """The measurement killed or hung the worker process; the daemon restarted it."""

    code = "INTERNAL"


class JobCancelled(Exception):
    """The job was abandoned because its caller stopped waiting. `killed` tells whether the
    worker had to be killed (and restarted) rather than interrupted."""

    def __init__(self, killed: bool) -> None:
        super().__init__("the measurement was abandoned: its caller stopped waiting")
        self.killed = killed


class Interrupted(BaseException):
    """Raised inside the worker by SIGUSR1 (a BaseException, so that no `except Exception`
    on the way, e.g. around session creation, swallows it)."""


@dataclass(frozen=True)
class Job:
    key: tuple[str, ...]                          # session cache key (graph + options)
    session: SessionSpec
    policy: MeasurePolicy
    cap_s: float                                  # the daemon's cap on one measurement
    deadline_in_s: float | None                   # the client's deadline, seconds from now
    input_shapes: dict[str, tuple[int, ...]] | None = None
    input_feeds: dict[str, InputFeed] | None = None  # a model's input values or ranges


# -- the worker side --------------------------------------------------------------------------
class _Interruptible:
    """Where SIGUSR1 may interrupt the worker: inside `with` blocks (session creation, timing),
    never while it talks to the daemon. A signal that arrives outside one is kept and
    interrupts the next block of the same job."""

    def __init__(self) -> None:
        self.inside = False
        self.pending = False

    def on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self.inside:
            self.inside = False
            raise Interrupted()
        self.pending = True

    def new_job(self) -> None:
        self.pending = False  # a signal meant for an earlier job, which had already answered

    def __enter__(self) -> None:
        if self.pending:
            self.pending = False
            raise Interrupted()
        self.inside = True

    def __exit__(self, *exc: object) -> None:
        self.inside = False


def _serve(conn: Connection, cache_size: int) -> None:
    import onnxruntime as ort

    from device_server.timer import PreparedSession, TimeBudget, create_session, time_callable

    ort.set_default_logger_severity(3)  # errors only: they come back as exceptions anyway
    interruptible = _Interruptible()
    signal.signal(signal.SIGUSR1, interruptible.on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when its worker stops
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
        interruptible.new_job()
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
                    with interruptible:
                        prepared = create_session(blob, job.session, job.input_shapes,
                                                  feeds=job.input_feeds)
                except InvalidConfigError:
                    raise
                except Exception as exc:
                    raise InvalidConfigError(f"cannot prepare the session: {exc}") from exc
                sessions[job.key] = prepared
                while len(sessions) > cache_size:
                    sessions.popitem(last=False)
            sessions.move_to_end(job.key)
            deadline = None if job.deadline_in_s is None else time.monotonic() + job.deadline_in_s
            try:
                with interruptible:
                    timing = time_callable(prepared.run, job.policy,
                                           TimeBudget(job.cap_s, deadline),
                                           create_ms=prepared.create_ms if created else 0.0)
            except Exception as exc:
                # ORT raises its own types, or RuntimeError from run_with_iobinding.
                if not (isinstance(exc, RuntimeError)
                        or type(exc).__module__.startswith("onnxruntime")):
                    raise
                # The runtime refused to run the graph (shapes it cannot compute, a kernel
                # that rejects its attributes): the model is at fault, not the device.
                raise InvalidConfigError(f"ONNX Runtime cannot run the model: {exc}") from exc
            conn.send(("ok", timing))
        except Interrupted:
            conn.send(("cancelled",))
        except MeasurementError as exc:
            conn.send(("error", exc))
        except Exception as exc:  # keep serving; the daemon reports it as INTERNAL
            conn.send(("error", MeasurementError(f"{type(exc).__name__}: {exc}")))


def _relay_output(stream: IO[bytes], pid: int) -> None:
    """Logs what the worker writes (ONNX Runtime's own lines, a traceback as it dies), one
    line each, without escape sequences. Ends when the worker's end of the pipe closes."""
    with stream:
        for raw in stream:
            line = strip_escapes(raw.decode("utf-8", "replace")).strip()
            if not line:
                continue
            if _ORT_LINE.search(line):
                ort_log.info("worker %d: %s", pid, line)
            else:
                log.warning("worker %d: %s", pid, line)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    conn = Connection(int(args[0]))
    _serve(conn, int(args[1]))
    return 0


# -- the daemon side --------------------------------------------------------------------------
def _describe_exit(code: int | None) -> str:
    return describe_exit(code, unknown="stopped answering")


class MeasureWorker:
    """The daemon's handle on its worker process. One job at a time (the device queue already
    serialises measurements; the lock makes it true for any caller)."""

    def __init__(self, cache_size: int = 64, hang_grace_s: float = 30.0,
                 cancel_grace_s: float = 1.0) -> None:
        """`hang_grace_s`: time beyond a job's budget (which the worker enforces itself between
        phases) for session creation, which the budget does not bound, before a hang is
        declared and the worker killed. `cancel_grace_s`: how long an abandoned job may take to
        stop once interrupted before its worker is killed instead."""
        self.cache_size = cache_size
        self.hang_grace_s = hang_grace_s
        self.cancel_grace_s = cancel_grace_s
        self.restarts = 0
        self.interrupted = 0               # abandoned jobs stopped by SIGUSR1
        self.killed_on_cancel = 0          # abandoned jobs that needed SIGKILL and a restart
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
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        finally:
            theirs.close()
        assert self._proc.stdout is not None
        threading.Thread(target=_relay_output, args=(self._proc.stdout, self._proc.pid),
                         name=f"worker-{self._proc.pid}-output", daemon=True).start()
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

    def _recv(self, timeout_s: float, what: str,
              stop: Callable[[], bool] | None = None) -> Any:
        """The worker's next reply. While waiting, `stop()` is asked every `_POLL_S`: once it
        says the caller is gone, the job is abandoned (`JobCancelled`)."""
        assert self._conn is not None
        end = time.monotonic() + timeout_s
        try:
            while True:
                left = end - time.monotonic()
                if self._conn.poll(max(0.0, min(left, _POLL_S if stop else left))):
                    return self._conn.recv()
                if stop is not None and stop():
                    raise self._abandon(what)
                if left <= 0:
                    break
            hang = f"did not finish within {timeout_s:.0f} s and was killed"
        except (EOFError, OSError):
            hang = None
        raise self._restart(what, hang)

    def _abandon(self, what: str) -> JobCancelled:
        """Interrupts the running job; kills the worker if it does not answer in time. The
        conversation is left in step: the reply to the job (whatever it is) is consumed."""
        assert self._proc is not None and self._conn is not None
        try:
            os.kill(self._proc.pid, signal.SIGUSR1)
            end = time.monotonic() + self.cancel_grace_s
            while self._conn.poll(max(0.0, end - time.monotonic())):
                reply = self._conn.recv()
                if reply[0] == "need_model":  # it was about to create a session: none
                    self._conn.send(("model", None))
                    continue
                self.interrupted += 1
                log.info("abandoned %s: the worker stopped it (%s)", what, reply[0])
                return JobCancelled(killed=False)
        except (EOFError, OSError):
            pass
        self._kill()
        self.killed_on_cancel += 1
        self.restarts += 1
        log.warning("abandoned %s: the worker did not stop within %.1f s of the interrupt; "
                    "killed it and started a fresh one", what, self.cancel_grace_s)
        try:
            self._start()  # while the device is still held: the next job finds a worker
        except RuntimeError as exc:
            log.error("%s; the next measurement tries again", exc)
        return JobCancelled(killed=True)

    def _restart(self, what: str, reason: str | None = None) -> WorkerCrashed:
        code = self._kill()
        self.restarts += 1
        message = (f"the measurement worker {reason or _describe_exit(code)} while measuring "
                   f"{what}; the daemon restarted it (this config may crash ONNX Runtime on "
                   f"this device)")
        log.error(message)
        self._start()
        return WorkerCrashed(message)

    def measure(self, job: Job, model_bytes: Callable[[], bytes], what: str,
                stop: Callable[[], bool] | None = None) -> TimingStats:
        """Times `job` in the worker; `model_bytes` is called only if the worker lacks the
        session. `what` names the config in a crash message. `stop()` (asked every 50 ms while
        the job runs) turns true when nobody waits for the result any more.

        Raises:
            MeasurementError: what the measurement raised (bad model, over the cap, deadline).
            WorkerCrashed: the worker died or hung; a fresh one is already running.
            JobCancelled: `stop()` turned true; the job was interrupted (or its worker killed).
        """
        budget_s = job.cap_s if job.deadline_in_s is None else min(job.cap_s, job.deadline_in_s)
        timeout_s = max(budget_s, 0.0) + self.hang_grace_s
        with self._lock:
            if self._conn is None:
                self._start()
            assert self._conn is not None
            try:
                self._conn.send(("measure", job))
                reply = self._recv(timeout_s, what, stop)
                if reply[0] == "need_model":
                    try:
                        blob: bytes | None = model_bytes()
                    except BaseException:
                        self._conn.send(("model", None))  # keep the conversation in step
                        self._recv(timeout_s, what)
                        raise
                    self._conn.send(("model", blob))
                    reply = self._recv(timeout_s, what, stop)
            except OSError:  # the worker was gone before we wrote (broken pipe)
                raise self._restart(what) from None
        if reply[0] == "error":
            raise reply[1]
        if reply[0] == "cancelled":  # an interrupt meant for this job that came in late
            raise JobCancelled(killed=False)
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
