"""Where a deploy goes: `DEVICE=` parsed into a target, with errors that show a valid form.

    ssh://[USER@]HOST[:PORT]   a machine with sshd (Termux's listens on 8022)
    adb[:SERIAL]               an Android phone over USB; its Termux sshd is reached through
                               `adb forward`, so the rest of the deploy is the ssh path
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["SshTarget", "AdbTarget", "Target", "TargetError", "parse_device", "TERMUX_SSH_PORT",
           "DEVICE_FORMS"]

TERMUX_SSH_PORT = 8022  # Termux's sshd cannot use a privileged port
DEVICE_FORMS = "ssh://[USER@]HOST[:PORT] or adb[:SERIAL]"

_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


class TargetError(ValueError):
    """`DEVICE=` is not a device this tool can reach; the message shows the accepted forms."""


@dataclass(frozen=True)
class SshTarget:
    """A device reached with ssh: `user` None means ssh's default (the local user name)."""

    host: str
    port: int = 22
    user: str | None = None

    @property
    def destination(self) -> str:
        """What ssh takes as its destination argument (the port goes in `-p`)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def key(self) -> str:
        """A file-name-safe name for this device (the host token's file name)."""
        user = f"{self.user}@" if self.user else ""
        return _safe(f"{user}{self.host}_{self.port}")

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        return f"ssh://{user}{host}:{self.port}"


@dataclass(frozen=True)
class AdbTarget:
    """An Android phone over adb; `serial` None means adb's only device."""

    serial: str | None = None
    ssh_port: int = TERMUX_SSH_PORT  # Termux's sshd, on the phone
    user: str | None = None          # Termux's sshd accepts any user name

    @property
    def key(self) -> str:
        return _safe(f"adb_{self.serial or 'default'}")

    def __str__(self) -> str:
        return f"adb:{self.serial}" if self.serial else "adb"


Target = SshTarget | AdbTarget


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]", "_", text)


def _port(text: str, device: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise TargetError(f"DEVICE={device}: port must be 1..65535, got {text!r}")
    return int(text)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host)) and len(host) <= 253


def _parse_ssh(device: str) -> SshTarget:
    rest = device[len("ssh://"):].rstrip("/")
    user: str | None = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        if not _USER_RE.match(user):
            raise TargetError(f"DEVICE={device}: {user!r} is not a user name")
    port = 22
    if rest.startswith("["):  # [IPv6]:PORT
        host, sep, tail = rest[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise TargetError(f"DEVICE={device}: expected [IPV6] or [IPV6]:PORT")
        if tail:
            port = _port(tail[1:], device)
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = _port(port_text, device)
    else:
        host = rest
    if not host or not _valid_host(host):
        raise TargetError(f"DEVICE={device}: {host!r} is not a host name or address; "
                          f"expected {DEVICE_FORMS}")
    return SshTarget(host=host, port=port, user=user)


def parse_device(device: str) -> Target:
    """`ssh://[USER@]HOST[:PORT]` or `adb[:SERIAL]` as a target.

    Raises:
        TargetError: anything else, or a malformed user, host, port or serial.
    """
    device = device.strip()
    if not device:
        raise TargetError(f"no device given: expected DEVICE={DEVICE_FORMS}")
    if device.startswith("ssh://"):
        return _parse_ssh(device)
    if device == "adb":
        return AdbTarget()
    if device.startswith("adb:"):
        serial = device[len("adb:"):]
        if not serial or not _SERIAL_RE.match(serial):
            raise TargetError(f"DEVICE={device}: expected adb:SERIAL with the serial that "
                              f"`adb devices` lists")
        return AdbTarget(serial=serial)
    raise TargetError(f"DEVICE={device}: expected {DEVICE_FORMS}")
