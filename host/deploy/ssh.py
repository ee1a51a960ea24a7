"""Thin wrappers over the `ssh` client: the command lines, and running them with the errors a
user can act on.

Everything goes through ssh's standard input (a script for `sh -s`, or a file for `cat`), so
no scp or sftp is needed on the device and no secret appears on a command line. BatchMode: a
deploy never stops to ask for a password; set up key login first.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from host.deploy.remote import REMOTE_ERROR_STATUS
from host.deploy.target import SshTarget

__all__ = ["SshOptions", "SshError", "RemoteError", "ssh_command", "run_ssh"]

log = logging.getLogger(__name__)

_SSH_FAILED = 255  # ssh's own failures (connect, authenticate); the remote command's otherwise


class SshError(RuntimeError):
    """ssh could not connect or log in; the message says how to fix the usual causes."""


class RemoteError(RuntimeError):
    """The script on the device failed; the message is its error line and the log it showed."""


@dataclass(frozen=True)
class SshOptions:
    """How to run ssh. The defaults are ssh's own (~/.ssh/config, keys, known_hosts)."""

    identity: str | None = None        # -i FILE
    config: str | None = None          # -F FILE
    options: tuple[str, ...] = ()      # each "Key=Value", as -o; they win over the defaults
    connect_timeout_s: int = 15
    program: str = "ssh"


def ssh_command(target: SshTarget, opts: SshOptions, remote_command: str) -> list[str]:
    """The ssh command line that runs `remote_command` on `target`.

    The user's `-o` options come first: for ssh the first value given for an option wins.
    """
    cmd = [opts.program, "-T", "-p", str(target.port)]
    if opts.config:
        cmd += ["-F", opts.config]
    if opts.identity:
        cmd += ["-i", opts.identity, "-o", "IdentitiesOnly=yes"]
    for option in opts.options:
        cmd += ["-o", option]
    cmd += [
        "-o", "BatchMode=yes",
        "-o", f"ConnectTimeout={opts.connect_timeout_s}",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
        "--", target.destination, remote_command,
    ]
    return cmd


def _hint(target: SshTarget, stderr: str) -> str:
    text = stderr.lower()
    port = f" -p {target.port}" if target.port != 22 else ""
    if "permission denied" in text:
        return (f"set up key login first: ssh-copy-id{port} {target.destination} "
                f"(on Termux: run `passwd` there once, or append your key to "
                f"~/.ssh/authorized_keys)")
    if "connection refused" in text:
        return ("is sshd running on the device? (on Termux: `pkg install openssh` then `sshd`; "
                "it listens on 8022)")
    if "host key verification failed" in text:
        return (f"connect once by hand to check and accept its host key: "
                f"ssh{port} {target.destination}")
    if "timed out" in text or "no route to host" in text:
        return "is the device on this network and awake?"
    return ""


def _pump(data: bytes, stream: IO[bytes]) -> None:
    try:
        stream.write(data)
    except BrokenPipeError:  # the remote side failed early; its error says why
        pass
    finally:
        try:
            stream.close()
        except BrokenPipeError:
            pass


def _drain(stream: IO[bytes], into: list[bytes]) -> None:
    into.append(stream.read())


def run_ssh(target: SshTarget, opts: SshOptions, remote_command: str, stdin: bytes = b"",
            timeout_s: float = 600.0, on_line: Callable[[str], None] | None = None) -> str:
    """Runs `remote_command` on `target` with `stdin`; returns its standard output.

    Args:
        on_line: called with each line of output as it arrives (progress).

    Raises:
        SshError: ssh could not connect or log in, or the command ran past `timeout_s`.
        RemoteError: the command failed; its `netadapt-error:` lines (or its stderr) and the
            log lines it printed are the message.
    """
    cmd = ssh_command(target, opts, remote_command)
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise SshError(f"{opts.program} not found: install the OpenSSH client") from None
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    feeder = threading.Thread(target=_pump, args=(stdin, proc.stdin), daemon=True)
    feeder.start()
    err_chunks: list[bytes] = []
    err_reader = threading.Thread(target=_drain, args=(proc.stderr, err_chunks), daemon=True)
    err_reader.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    lines: list[str] = []
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if on_line is not None:
                on_line(line)
        status = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    feeder.join(timeout=5)
    err_reader.join(timeout=5)
    stdout = "\n".join(lines)
    stderr = b"".join(err_chunks).decode(errors="replace")
    if timed_out.is_set():
        raise SshError(f"{target}: no answer within {timeout_s:g} s")
    if status == _SSH_FAILED:
        last = stderr.strip().splitlines()[-1].rstrip(".") if stderr.strip() else "ssh failed"
        hint = _hint(target, stderr)
        raise SshError(f"ssh to {target} failed: {last}" + (f"; {hint}" if hint else ""))
    if status != 0:
        raise RemoteError(_remote_message(target, status, stderr))
    return stdout


def _remote_message(target: SshTarget, status: int, stderr: str) -> str:
    errors = [ln[len("netadapt-error: "):] for ln in stderr.splitlines()
              if ln.startswith("netadapt-error: ")]
    details = [ln for ln in stderr.splitlines() if ln.startswith("  | ")]
    if errors:
        message = f"on {target}: {errors[-1]}"
    else:
        tail = stderr.strip().splitlines()[-3:]
        message = f"on {target}: the remote command failed (exit {status})" + (
            ": " + " / ".join(tail) if tail else "")
    if status == REMOTE_ERROR_STATUS and details:
        message += "\n" + "\n".join(details)
    return message

