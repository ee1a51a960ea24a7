"""`adb forward`: the one thing adb does in a deploy. A phone on USB is reached through a
forwarded loopback port to Termux's sshd, after which a deploy is the ssh path; the daemon's
port is forwarded the same way, so the host measures through `127.0.0.1:PORT`.

Kept thin on purpose: the command lines are built here and unit-tested; running them needs a
phone.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

__all__ = ["AdbError", "adb_base", "forward_command", "remove_forward_command", "forward",
           "remove_forward"]


class AdbError(RuntimeError):
    """adb is missing, sees no (or several) phones, or refused the forward."""


def adb_base(serial: str | None, program: str = "adb") -> list[str]:
    return [program, "-s", serial] if serial else [program]


def forward_command(serial: str | None, local_port: int, remote_port: int,
                    program: str = "adb") -> list[str]:
    """`adb [-s SERIAL] forward tcp:LOCAL tcp:REMOTE`; LOCAL 0 lets adb pick a free port (and
    print it)."""
    return [*adb_base(serial, program), "forward", f"tcp:{local_port}", f"tcp:{remote_port}"]


def remove_forward_command(serial: str | None, local_port: int, program: str = "adb"
                           ) -> list[str]:
    return [*adb_base(serial, program), "forward", "--remove", f"tcp:{local_port}"]


def _run(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise AdbError(f"{cmd[0]} not found: install Android platform-tools "
                       f"(e.g. apt install adb)") from None
    except subprocess.TimeoutExpired:
        raise AdbError(f"`{' '.join(cmd)}` did not answer within 30 s") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip().splitlines()
        last = message[-1] if message else f"exit {done.returncode}"
        hint = ""
        if "more than one" in last:
            hint = "; name one: DEVICE=adb:SERIAL (see `adb devices`)"
        elif "no devices" in last or "not found" in last:
            hint = "; is the phone plugged in with USB debugging allowed? (`adb devices`)"
        raise AdbError(f"`{' '.join(cmd)}` failed: {last}{hint}")
    return done.stdout


def forward(serial: str | None, local_port: int, remote_port: int, program: str = "adb") -> int:
    """Forwards host `127.0.0.1:local_port` to the phone's `remote_port`; returns the local port
    (the one adb picked when `local_port` is 0).

    Raises:
        AdbError: adb failed; the message says why.
    """
    out = _run(forward_command(serial, local_port, remote_port, program))
    if local_port:
        return local_port
    picked = out.strip().splitlines()[-1:] or [""]
    if not picked[0].isdigit():
        raise AdbError(f"adb forward tcp:0 printed {out.strip()!r}, not a port number")
    return int(picked[0])


def remove_forward(serial: str | None, local_port: int, program: str = "adb") -> None:
    """Removes a forward; one that is already gone is not an error."""
    try:
        _run(remove_forward_command(serial, local_port, program))
    except AdbError:
        pass
