"""Android's system properties (`getprop`), the phone's own account of what it is.

`ro.product.manufacturer` / `ro.product.model` name the phone ("Google" / "Pixel 8"),
`ro.soc.manufacturer` / `ro.soc.model` its chip (Android 12 and later), and
`ro.build.fingerprint` the exact OS build. All are read-only properties set at build time: the
same after every reboot, changed by an OS update. Termux can run /system/bin/getprop (not on
its PATH); one call lists them all as `[key]: [value]` lines.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

__all__ = ["IDENTITY_PROPS", "parse_getprop", "read_props"]

log = logging.getLogger(__name__)

IDENTITY_PROPS = ("ro.product.manufacturer", "ro.product.model", "ro.soc.manufacturer",
                  "ro.soc.model", "ro.build.fingerprint", "ro.build.version.release",
                  "ro.board.platform", "ro.hardware")

_LINE = re.compile(r"^\[([^\]]+)\]:\s*\[(.*)\]\s*$")


def parse_getprop(text: str) -> dict[str, str]:
    """`getprop`'s listing -> {key: value}; lines of any other shape are skipped."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            props[match[1]] = match[2]
    return props


def read_props(program: str | None = "getprop", timeout_s: float = 10.0) -> dict[str, str]:
    """The identity properties (IDENTITY_PROPS) that are set; {} off Android or when
    `program` (looked up on PATH; None: never) does not run."""
    if not program:
        return {}
    path = shutil.which(program)
    if path is None and "/" not in program and os.access(f"/system/bin/{program}", os.X_OK):
        path = f"/system/bin/{program}"  # Termux's PATH holds only its own prefix
    if path is None:
        return {}
    try:
        done = subprocess.run([path], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot run %s: %s", path, exc)
        return {}
    props = parse_getprop(done.stdout)
    return {k: props[k] for k in IDENTITY_PROPS if props.get(k)}
