"""Which devices a host command measures on: the daemons named with `--device`, or a daemon
started on loopback for the run (the embedded default), as one `DevicePool`."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from host.device.local_daemon import start_local_daemon
from host.device.pool import DevicePool

__all__ = ["read_token", "open_pool", "TokenFileError"]

log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The token file cannot be read or is empty."""


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    return token


@contextlib.contextmanager
def open_pool(addresses: Sequence[str], token: str | None = None, threads: int = 1,
              timeout_s: float = 120.0,
              tls_root_cert: str | None = None) -> Iterator[DevicePool]:
    """A pool over `addresses` (TLS-verified with `tls_root_cert` when given), or over a
    loopback daemon started for the body when empty.

    Raises:
        DeviceError: a device cannot be reached (the message names it).
        FingerprintMismatch: the devices are not alike.
        DaemonStartError: the loopback daemon did not start.
    """
    if addresses:
        with DevicePool.connect(addresses, token=token, timeout_s=timeout_s,
                                tls_root_cert=tls_root_cert) as pool:
            yield pool
        return
    log.info("no --device: starting a daemon on loopback for this run")
    with start_local_daemon(threads=threads, token=token) as daemon:
        with DevicePool([daemon.client(timeout_s=timeout_s)]) as pool:
            yield pool
