"""Process checks shared by the tests that kill a host and look for what it left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def kill_host_and_find_survivors(code: str, pid_file: Path, cwd: Path, what: str,
                                 start_s: float) -> list[int]:
    """Runs `code` as a host process that writes the pids of what it started into `pid_file`,
    checks they run, SIGKILLs the host (no chance to clean up) and returns those of them still
    running 30 s later. Whatever is left is killed before returning."""
    host = subprocess.Popen([sys.executable, "-c", code], cwd=cwd)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + start_s
        while not pid_file.exists() or not pid_file.read_text():
            assert host.poll() is None, f"the host exited before starting its {what}"
            assert time.monotonic() < deadline, f"the {what} did not start within {start_s:.0f} s"
            time.sleep(0.1)
        pids = [int(p) for p in pid_file.read_text().split()]
        assert pids and host.pid not in pids and all(alive(p) for p in pids)
        host.kill()
        host.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [p for p in pids if alive(p)]
    finally:
        if host.poll() is None:
            host.kill()
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
