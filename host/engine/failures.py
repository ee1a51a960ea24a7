"""Why a run stopped, said in one line that tells the user what to do.

A run can be stopped by things outside the algorithm: a proposal worker killed (the OOM killer,
a signal), a Ray task that failed past its retries, the device lost mid-run, a full disk while
writing a checkpoint or a table row. Each becomes a `RunFailure` naming what broke (the signal,
the proposal, the device, the file); `run_failures` adds where the run is kept and that
`--resume` continues it, since every completed iteration is checkpointed.

The writers here (`save_checkpoint`, `append_line`) fail cleanly on a full disk: the previous
file stays whole, and a half-written line is taken back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RunFailure", "ProposalWorkerDied", "ProposalTaskFailed", "DeviceLost",
           "DiskFull", "describe_proposal", "is_disk_full", "run_failures",
           "save_checkpoint", "append_line"]

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class RunFailure(Exception):
    """A run stopped by something outside it. `str()` is the one line to show; once the
    run's folder is known (`run_failures`) it ends with how to continue."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.workdir: Path | None = None
        self.resumable = False

    def __str__(self) -> str:
        if self.workdir is None:
            return self.what
        if self.resumable:
            return (f"{self.what}; {self.workdir} keeps every completed iteration: continue "
                    f"with --resume --workdir {self.workdir}")
        return f"{self.what}; nothing was checkpointed yet: run the command again"


class ProposalWorkerDied(RunFailure):
    """A local proposal worker process died (a signal, or an exit) mid-iteration."""


class ProposalTaskFailed(RunFailure):
    """A Ray task failed past its retries (worker or node lost, or the task raised)."""


class DeviceLost(RunFailure):
    """The measuring device stopped answering (or failed) mid-run."""


class DiskFull(RunFailure):
    """A checkpoint, history line or table row could not be written: no space left."""


def describe_proposal(proposal: Any, iteration: int) -> str:
    """'proposal of group 3 (features.6.conv -> 24 channels) in iteration 1'."""
    return (f"proposal of group {proposal.group_id} ({proposal.root} -> {proposal.n_keep} "
            f"channels) in iteration {iteration}")




def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk (or quota, or file size limit), or a table's own such error."""
    from lut.store import LutDiskFull

    if isinstance(exc, LutDiskFull):
        return True
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def _as_failure(exc: BaseException) -> RunFailure | None:
    from host.device.client import DeviceError

    if isinstance(exc, RunFailure):
        return exc
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or getattr(exc, "path", None) or "a file"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "disk full"
        return DiskFull(f"cannot write {where}: {reason}; free some space")
    if isinstance(exc, DeviceError):
        device = exc.address or "the device"
        # A pool's error wraps its last device's: say that one once.
        detail = exc.message
        if detail.startswith("every device of the pool failed"):
            detail = detail.partition("; last error: ")[2].split(": ", 1)[-1] or detail
        if exc.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            return DeviceLost(f"lost {device} mid-run ({exc.code}: {detail})")
        return DeviceLost(f"{device} failed mid-run ({exc.code}: {detail})")
    return None


@contextlib.contextmanager
def run_failures(workdir: Path, state_file: Path) -> Iterator[None]:
    """Turns what stops a run from outside (see the module docstring) into a `RunFailure`
    that says where the run is kept and whether `--resume` continues it (it does once
    `state_file`, the first checkpoint, exists)."""
    try:
        yield
    except Exception as exc:
        failure = _as_failure(exc)
        if failure is None:
            raise
        failure.workdir = Path(workdir)
        failure.resumable = Path(state_file).exists()
        log.info("run stopped: %s", failure.what)
        if failure is exc:
            raise
        raise failure from exc


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def save_checkpoint(obj: Any, path: Path) -> None:
    """`torch.save(obj)` to `path` atomically: serialised in memory, written beside, renamed
    over. A full disk raises OSError(ENOSPC) naming the file (torch's own writer would raise
    a bare RuntimeError) and leaves the previous `path` whole."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, buffer.getbuffer())
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    os.replace(tmp, path)


def append_line(path: Path, line: str) -> None:
    """Appends `line` to `path`; if the disk fills midway, cuts the file back to where it
    was (no half line for a reader to trip on) and raises OSError naming the file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, line.encode())
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)
