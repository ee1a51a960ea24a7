"""Real failures for the host-failure tests and `make bench-reliability`: a data set whose reader
is SIGKILLed (once, or every time), a small tmpfs that really fills up, a file that fills it.

`kill_once_splits` is a `--data package.module:factory` for the CLI: the small MNIST splits whose
training set kills the first process that reads it (`NETADAPT_KILL_MARKER` names the marker
file that records the victim's pid)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from host.data import DataSplits
from tests.helpers_engine import KillOnce, small_splits

__all__ = ["KillAlways", "kill_once_splits", "small_tmpfs", "fill", "TmpfsUnavailable"]


class KillAlways(Dataset[Any]):
    """Every read SIGKILLs the reading process: a task that dies on every retry."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


def kill_once_splits() -> DataSplits:
    """The small splits, with a training set that kills its first reader (see module doc)."""
    splits = small_splits()
    marker = Path(os.environ["NETADAPT_KILL_MARKER"])
    return DataSplits(KillOnce(splits.train, marker), splits.holdout, splits.test,
                      splits.num_classes, splits.input_shape, name="mnist-kill-once")


class TmpfsUnavailable(RuntimeError):
    """This machine does not let us mount a tmpfs (not root, or no CAP_SYS_ADMIN)."""


@contextlib.contextmanager
def small_tmpfs(where: Path, size_kib: int) -> Iterator[Path]:
    """A real, small filesystem at `where`: writes beyond `size_kib` fail with ENOSPC."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k",
                           f"netadapt-test-{uuid.uuid4().hex[:8]}", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise TmpfsUnavailable(done.stderr.strip() or f"mount exited {done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Writes a filler file in `folder` until at most `leave_bytes` are free (or the disk is
    full when 0); returns it, to delete to free the space again."""
    filler = folder / f"filler-{uuid.uuid4().hex[:8]}"
    stat = os.statvfs(folder)
    want = max(0, stat.f_bavail * stat.f_frsize - leave_bytes)
    chunk = b"\0" * 65536
    written = 0
    with open(filler, "wb", buffering=0) as f:
        try:
            while leave_bytes == 0 or written < want:
                n = f.write(chunk if leave_bytes == 0 else chunk[:min(65536, want - written)])
                if not n:
                    break
                written += n
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler
