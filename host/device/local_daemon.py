"""The embedded default: a measurement daemon started on loopback for one host run.

When the user names no `--device`, the host starts `python -m device_server serve` as a child
process on 127.0.0.1 with a free port (`--port 0 --port-file F`), waits until the port file
appears and the daemon's health service says SERVING, and stops it (SIGTERM, then SIGKILL if it
lingers) when done. The daemon's output goes to a log file, shown in the error when it fails
to start.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType

from host.device.client import DeviceClient, DeviceError

__all__ = ["LocalDaemon", "DaemonStartError", "start_local_daemon"]

logger = logging.getLogger(__name__)

_LOG_TAIL_LINES = 15


class DaemonStartError(RuntimeError):
    """The local daemon did not come up; the message carries the tail of its log."""


class LocalDaemon:
    """A daemon process on loopback, owned by this process. Stop it with `stop()` or `with`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        workdir: pathlib.Path,
        token: str | None,
    ) -> None:
        self.process = process
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.token = token
        self.workdir = workdir
        self.log_path = workdir / "daemon.log"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def client(self, timeout_s: float = 60.0, retries: int = 3) -> DeviceClient:
        """A client of this daemon, with its token."""
        return DeviceClient(self.address, token=self.token, timeout_s=timeout_s, retries=retries)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Idempotent. Returns the exit code."""
        if self.process.poll() is None:
            logger.debug("stopping local daemon pid %d", self.process.pid)
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "local daemon pid %d ignored SIGTERM for %.0f s; killing it",
                    self.process.pid,
                    timeout_s,
                )
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> LocalDaemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.process.returncode}"
        return f"LocalDaemon(address={self.address!r}, pid={self.process.pid}, {state})"


def _child_env() -> dict[str, str]:
    """The environment of the child, with the directory holding `device_server` on its path
    so that the child runs the same code as this process, installed or not."""
    env = dict(os.environ)
    found = importlib.util.find_spec("device_server")
    if found is not None and found.origin is not None:
        root = str(pathlib.Path(found.origin).resolve().parent.parent)
        parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in parts:
            env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_local_daemon(
    threads: int = 1,
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 60.0,
    token: str | None = None,
    cpus: Sequence[int] = (),
) -> LocalDaemon:
    """Starts a daemon on 127.0.0.1 with a free port and waits until it is SERVING.

    Args:
        threads: the daemon's default intra-op threads (`--threads`).
        extra_args: more `serve` arguments, passed as given.
        startup_timeout_s: how long to wait for the port file and the SERVING status.
        token: if given, the daemon requires it (written to a private `--token-file`).
        cpus: pin the daemon to these CPUs (`--cpus`); empty: wherever the OS runs it.

    Raises:
        DaemonStartError: the daemon exited or was not SERVING in time; the message carries
            the end of its log.
    """
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="netadapt-daemon-"))
    port_file = workdir / "port"
    log_path = workdir / "daemon.log"
    cmd = [
        sys.executable,
        "-m",
        "device_server",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--threads",
        str(threads),
        "--exit-with-parent",  # a killed host leaves no daemon behind
    ]
    if cpus:
        cmd += ["--cpus", ",".join(str(c) for c in cpus)]
    if token is not None:
        token_file = workdir / "token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        cmd += ["--token-file", str(token_file)]
    cmd += list(extra_args)
    logger.info("starting local daemon: %s", " ".join(cmd))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_child_env()
        )
    daemon = LocalDaemon(process, 0, workdir, token)
    deadline = time.monotonic() + startup_timeout_s
    try:
        port = _wait_for_port(daemon, port_file, deadline, startup_timeout_s)
        daemon.port = port
        daemon.address = f"127.0.0.1:{port}"
        remaining = max(1.0, deadline - time.monotonic())
        with daemon.client(timeout_s=remaining, retries=0) as client:
            client.wait_ready(timeout_s=remaining)
    except DeviceError as exc:
        suffix = _tail_suffix(daemon)
        daemon.stop()
        raise DaemonStartError(f"the local daemon did not become ready ({exc}){suffix}") from None
    except BaseException:
        daemon.stop()
        raise
    logger.info("local daemon pid %d serving on %s", process.pid, daemon.address)
    return daemon


def _wait_for_port(
    daemon: LocalDaemon, port_file: pathlib.Path, deadline: float, timeout_s: float
) -> int:
    """Polls for the port file the daemon writes once it is serving."""
    delay = 0.02
    while True:
        code = daemon.process.poll()
        if code is not None:
            raise DaemonStartError(
                f"the local daemon exited with code {code} before serving"
                + _tail_suffix(daemon)
            )
        try:
            text = port_file.read_text().strip()
        except FileNotFoundError:
            text = ""
        if text:
            try:
                return int(text)
            except ValueError:
                pass  # written but not complete yet
        if time.monotonic() > deadline:
            raise DaemonStartError(
                f"the local daemon wrote no port file within {timeout_s:g} s"
                + _tail_suffix(daemon)
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


def _tail_suffix(daemon: LocalDaemon) -> str:
    tail = daemon.log_tail()
    return f":\n{tail}" if tail else ""
