"""Wheels for a device without internet: the device's requirements, downloaded by this host's
pip for the device's platform, and the check that a wheelhouse fits a device before it is sent.

pip chooses wheels by their tags (PEP 425, PEP 600): the Python (`cp311`, or `py3` for pure
Python; `abi3` wheels fit every later CPython), and the platform: `manylinux_2_28_aarch64`
installs on aarch64 Linux with glibc 2.28 or newer. A Raspberry Pi OS or Debian 12 board has
glibc 2.36, Ubuntu 22.04 (Jetson JetPack 6) 2.35; the default of 2.28 takes wheels that install
on all of them. PyPI has no onnxruntime wheels for 32-bit ARM or for Android (Termux installs
the binary packages with `pkg`), so those platforms are refused with the reason.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import Tag
from packaging.utils import InvalidWheelFilename, parse_wheel_filename

__all__ = ["WheelTarget", "WheelError", "parse_target", "download", "mismatches",
           "DEFAULT_PYTHON", "DEFAULT_GLIBC"]

log = logging.getLogger(__name__)

DEFAULT_PYTHON = "3.11"   # Debian 12 / Raspberry Pi OS 12
DEFAULT_GLIBC = "2.28"    # the newest manylinux of the device wheels (onnxruntime, numpy)
_MACHINES = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64"}
_REFUSED = {
    "armv7l": "PyPI has no onnxruntime wheels for 32-bit ARM: put a 64-bit OS on the board",
    "armv6l": "PyPI has no onnxruntime wheels for 32-bit ARM: put a 64-bit OS on the board",
    "android": "Termux installs numpy, grpcio and onnxruntime with pkg; PyPI's Linux wheels do "
               "not install on Android",
    "termux": "Termux installs numpy, grpcio and onnxruntime with pkg; PyPI's Linux wheels do "
              "not install on Android",
}
# The manylinux names before PEP 600, and the glibc they stand for.
_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
_PLATFORM_TAG = re.compile(
    r"^(?:manylinux_(?P<major>\d+)_(?P<minor>\d+)|(?P<legacy>manylinux(?:1|2010|2014))"
    r"|(?P<musl>musllinux_\d+_\d+)|(?P<linux>linux))_(?P<arch>.+)$")


class WheelError(RuntimeError):
    """Wheels for the device cannot be had; the message says why and what to do."""


def _version(text: str, what: str, parts: int = 2) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", text) or len(text.split(".")) < parts:
        raise WheelError(f"{what} {text!r} is not a version like "
                         f"{'3.11' if what.startswith('Python') else '2.28'}")
    return tuple(int(p) for p in text.split(".")[:parts])


@dataclass(frozen=True)
class WheelTarget:
    """The device's platform as pip sees it: machine, CPython version, glibc version."""

    machine: str                    # "aarch64" or "x86_64"
    python_version: str = DEFAULT_PYTHON
    glibc: str = DEFAULT_GLIBC

    @property
    def python_tag(self) -> str:
        major, minor = _version(self.python_version, "Python version")
        return f"cp{major}{minor}"

    def platform_tags(self) -> list[str]:
        """Every manylinux tag this glibc satisfies, newest first (pip takes several)."""
        major, minor = _version(self.glibc, "glibc version")
        oldest = 5 if self.machine == "x86_64" else 17
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, oldest - 1, -1)]
        tags += [f"{name}_{self.machine}" for name, (_, m) in _LEGACY.items()
                 if m <= minor and (m >= oldest)]
        return tags

    def describe(self) -> str:
        return f"Linux {self.machine}, CPython {self.python_version}, glibc >= {self.glibc}"

    def folder_name(self) -> str:
        return f"linux-{self.machine}-py{self.python_version}-glibc{self.glibc}"


def parse_target(platform: str, python_version: str = DEFAULT_PYTHON,
                 glibc: str = DEFAULT_GLIBC) -> WheelTarget:
    """The target for `--platform` (aarch64/arm64, x86_64/amd64).

    Raises:
        WheelError: a platform PyPI has no device wheels for, or a malformed version.
    """
    key = platform.strip().lower()
    if key in _REFUSED:
        raise WheelError(f"--platform {platform}: {_REFUSED[key]}")
    if key not in _MACHINES:
        raise WheelError(f"--platform {platform!r}: expected aarch64 (arm64) or x86_64 (amd64)")
    target = WheelTarget(_MACHINES[key], python_version, glibc)
    target.python_tag  # noqa: B018 (validates the versions now, not halfway through)
    target.platform_tags()
    return target


def download(target: WheelTarget, out: Path, requirements: Sequence[str],
             timeout_s: float = 1800.0) -> list[Path]:
    """Downloads the wheels of `requirements` and their dependencies for `target` into `out`
    with this host's pip (and its cache); returns the wheels there.

    Raises:
        WheelError: pip could not find or fetch a wheel; the message is pip's reason.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="device-requirements-") as req:
        req.write("\n".join(requirements) + "\n")
        req.flush()
        command = [sys.executable, "-m", "pip", "download", "--quiet",
                   "--disable-pip-version-check", "--only-binary=:all:", "--implementation", "cp",
                   "--python-version", target.python_version, "-d", str(out), "-r", req.name]
        for tag in target.platform_tags():
            command += ["--platform", tag]
        log.info("running %s", " ".join(command))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise WheelError(f"pip download took more than {timeout_s:.0f} s") from None
    if done.returncode != 0:
        errors = [line.strip() for line in done.stderr.splitlines()
                  if line.startswith("ERROR")] or done.stderr.strip().splitlines()[-1:]
        raise WheelError(f"pip download for {target.describe()} failed: "
                         f"{errors[0] if errors else f'exit {done.returncode}'}")
    return sorted(out.glob("*.whl"))


def _platform_why(platform: str, machine: str, glibc: tuple[int, int] | None) -> str:
    """'' when a wheel of this platform tag installs on the device; else what it is for."""
    if platform == "any":
        return ""
    m = _PLATFORM_TAG.match(platform)
    if m is None:
        return f"for {platform}"
    if m["arch"] != machine:
        return f"for {m['arch']}"
    if m["musl"]:
        return "for musl libc"
    need = (int(m["major"]), int(m["minor"])) if m["major"] else _LEGACY.get(m["legacy"] or "",
                                                                             (0, 0))
    return "" if glibc is None or need <= glibc else f"needs glibc {need[0]}.{need[1]}"


def _python_fits(tag: Tag, python: tuple[int, int]) -> bool:
    interp = tag.interpreter
    if interp.startswith("py"):
        return True
    if interp == f"cp{python[0]}{python[1]}":
        return True
    # A stable-ABI wheel built for CPython 3.x installs on every later 3.y.
    return (tag.abi == "abi3" and interp.startswith(f"cp{python[0]}")
            and interp[3:].isdigit() and int(interp[3:]) <= python[1])


def _why_not(tags: frozenset[Tag], machine: str, python: tuple[int, int],
             glibc: tuple[int, int] | None) -> str:
    """'' when one of the wheel's tags installs on the device; else the first thing that does
    not fit, in the order machine, Python, glibc."""
    if any(not _platform_why(t.platform, machine, glibc) and _python_fits(t, python)
           for t in tags):
        return ""
    platform_whys = sorted({_platform_why(t.platform, machine, None) for t in tags})
    if all(platform_whys):
        return platform_whys[0]
    if not any(_python_fits(t, python) for t in tags):
        return "for Python " + "/".join(sorted({t.interpreter for t in tags}))
    return sorted({_platform_why(t.platform, machine, glibc) for t in tags} - {""})[0]


def mismatches(wheelhouse: Path, machine: str, python_version: str,
               glibc: str | None = None) -> list[str]:
    """The wheels in `wheelhouse` that will not install on the device, each with why:
    ['numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl (for x86_64)']."""
    python = _version(python_version, "Python version")
    libc = _version(glibc, "glibc version") if glibc else None
    bad: list[str] = []
    for wheel in sorted(wheelhouse.glob("*.whl")):
        try:
            _, _, _, tags = parse_wheel_filename(wheel.name)
        except InvalidWheelFilename:
            bad.append(f"{wheel.name} (not a wheel name)")
            continue
        why = _why_not(tags, machine, (python[0], python[1]),
                       (libc[0], libc[1]) if libc else None)
        if why:
            bad.append(f"{wheel.name} ({why})")
    return bad
