"""The device bundle: the daemon's code, the generated protos and a requirements list without
torch, as one reproducible tar.gz. Nothing of the host side goes in.

The same sources always give the same bytes (sorted entries, fixed times and owners), so the
bundle's sha256 says whether a device runs the code on this host.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import re
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Bundle", "BundleError", "build_bundle", "device_requirements", "source_root",
           "REQUIREMENTS_NAME", "MANIFEST_NAME"]

REQUIREMENTS_NAME = "requirements-device.txt"
MANIFEST_NAME = "BUNDLE"
_PACKAGES = ("device_server", "protos")
_SUFFIXES = (".py", ".proto")
_GENERATED = ("protos/device_pb2.py", "protos/device_pb2_grpc.py")
_HOST_ONLY = re.compile(r"^(torch|torchvision|torch-pruning)\b", re.IGNORECASE)


class BundleError(RuntimeError):
    """The bundle cannot be built from this checkout; the message says what to run."""


@dataclass(frozen=True)
class Bundle:
    data: bytes                       # the tar.gz
    sha256: str                       # of `data`
    files: tuple[str, ...]            # archive member names, sorted
    requirements: tuple[str, ...]     # the lines of requirements-device.txt

    @property
    def requirements_sha256(self) -> str:
        """Identifies the Python environment the device needs (a stamp in its venv)."""
        return hashlib.sha256("\n".join(self.requirements).encode()).hexdigest()


def source_root() -> Path:
    """The directory that holds the `device_server` and `protos` packages."""
    import device_server

    return Path(device_server.__file__).resolve().parent.parent


def device_requirements(root: Path | None = None) -> tuple[str, ...]:
    """The project's base dependencies (the device side), from pyproject.toml when this is a
    checkout, else from the installed package's metadata.

    Raises:
        BundleError: a dependency is host-only (torch): the device must never need it.
    """
    pyproject = (root or source_root()) / "pyproject.toml"
    if pyproject.is_file():
        with open(pyproject, "rb") as f:
            deps = list(tomllib.load(f)["project"]["dependencies"])
    else:
        deps = [d for d in importlib.metadata.requires("netadapt") or [] if "extra ==" not in d]
    bad = [d for d in deps if _HOST_ONLY.match(d)]
    if bad:
        raise BundleError(f"the device dependencies name host-only packages: {', '.join(bad)}")
    return tuple(sorted(deps, key=str.lower))


def _sources(root: Path) -> list[tuple[str, Path]]:
    missing = [name for name in _GENERATED if not (root / name).is_file()]
    if missing:
        raise BundleError(f"{', '.join(missing)} missing: generate them with `make protos`")
    proto = root / "protos" / "device.proto"
    if proto.stat().st_mtime > (root / _GENERATED[0]).stat().st_mtime:
        raise BundleError(f"{proto} changed after the code generated from it: run `make protos`")
    found = []
    for package in _PACKAGES:
        for path in sorted((root / package).iterdir()):
            if path.is_file() and path.suffix in _SUFFIXES:
                found.append((f"{package}/{path.name}", path))
    return found


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def build_bundle(root: Path | None = None) -> Bundle:
    """The bundle for the sources under `root` (default: where `device_server` is imported from).

    Raises:
        BundleError: the generated protos are missing, or the requirements name torch.
    """
    root = root or source_root()
    requirements = device_requirements(root)
    members = {name: path.read_bytes() for name, path in _sources(root)}
    members[REQUIREMENTS_NAME] = ("\n".join(requirements) + "\n").encode()
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(members[name]).digest())
    members[MANIFEST_NAME] = (f"sources {digest.hexdigest()}\n"
                              + "".join(f"{n}\n" for n in sorted(members))).encode()
    raw = io.BytesIO()
    # gzip's header holds a time: fix it too, so equal sources give equal bytes.
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in sorted(members):
                _add(tar, name, members[name])
    data = raw.getvalue()
    return Bundle(data=data, sha256=hashlib.sha256(data).hexdigest(),
                  files=tuple(sorted(members)), requirements=requirements)
