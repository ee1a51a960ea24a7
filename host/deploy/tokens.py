"""The host's copy of each device's bearer token: one file per device under
`$NETADAPT_HOME/devices/` (default `~/.config/netadapt/devices/`), readable by the user only,
so that `--token-file` works for every host command."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["netadapt_home", "token_path", "new_token", "read_host_token", "write_host_token"]


def netadapt_home() -> Path:
    """`$NETADAPT_HOME`, else `$XDG_CONFIG_HOME/netadapt`, else `~/.config/netadapt`."""
    if os.environ.get("NETADAPT_HOME"):
        return Path(os.environ["NETADAPT_HOME"]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "netadapt"


def token_path(home: Path, device_key: str) -> Path:
    return home / "devices" / f"{device_key}.token"


def new_token() -> str:
    """256 random bits, URL-safe (no characters a shell or a metadata header would mangle)."""
    return secrets.token_urlsafe(32)


def read_host_token(path: Path) -> str | None:
    """The token in `path`, or None when there is no such file (or it is empty)."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return token or None


def write_host_token(path: Path, token: str) -> None:
    """Writes `token` with mode 0600 in a directory with mode 0700, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old tmp file keeps its mode through O_CREAT
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
