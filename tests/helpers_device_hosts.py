"""Second hosts for the deploy tests: a network namespace with its own address behind a veth
pair, running its own sshd, reached from this host over ssh with keys made for the test.

Two kinds of host:
- `x86_host`: this machine's file system (the daemon goes to a directory under the test's tmp);
- `arm64_host`: an arm64 Debian userland (`arm64_userland`) in a chroot with its own mount and
  pid namespaces, executed through qemu-user (binfmt_misc): its sshd, shell, Python, pip,
  numpy and ONNX Runtime are aarch64 builds, as on a Raspberry Pi or a Jetson. It gets a fresh
  /proc and this machine's /dev, but not this machine's /sys (ONNX Runtime's cpuinfo reads x86
  topology there as ARM and crashes; a real board has its own). The userland is built once
  with debootstrap and kept in the cache (`NETADAPT_CACHE`, default /var/cache/netadapt as
  root); each test writes into an overlay on top of it, so every run starts from a clean board.

Everything here needs root; callers skip with the reason when `why_not_*` says so.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DeviceHost", "x86_host", "arm64_host", "arm64_userland", "cache_dir", "native_pids",
           "maps_of", "why_not_namespace", "why_not_arm64", "ARM64_SUITE", "ARM64_PACKAGES"]

SSHD = Path("/usr/sbin/sshd")
ARM64_SUITE = "bookworm"          # Debian 12, as Raspberry Pi OS 12: Python 3.11, glibc 2.36
ARM64_PACKAGES = ("python3", "python3-venv", "openssh-server")
_BINFMT = Path("/proc/sys/fs/binfmt_misc")
_QEMU_AARCH64 = _BINFMT / "qemu-aarch64"


@dataclass(frozen=True)
class DeviceHost:
    namespace: str
    address: str            # the device's own address, reached through the veth pair
    port: int               # its sshd's
    ssh_config: Path        # key, known host key; nothing from the user's ~/.ssh
    files: Path             # where what the device writes under / shows up on this host

    @property
    def device(self) -> str:
        return f"ssh://root@{self.address}:{self.port}"

    def ssh(self, command: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", str(self.ssh_config), "-p", str(self.port),
                               f"root@{self.address}", command],
                              capture_output=True, text=True, timeout=timeout_s)

    def pids(self) -> list[int]:
        """Every process on the device, as this host numbers them."""
        out = subprocess.run(["ip", "netns", "pids", self.namespace], capture_output=True,
                             text=True)
        return [int(p) for p in out.stdout.split()]


def _sh(*args: str, timeout_s: float = 30) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=timeout_s)


def cache_dir() -> Path:
    """Where built userlands and downloaded wheels are kept between runs."""
    if os.environ.get("NETADAPT_CACHE"):
        return Path(os.environ["NETADAPT_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/netadapt")
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "netadapt"


def why_not_namespace() -> str | None:
    """None when a namespace host can be made here; else the one-line reason."""
    if os.geteuid() != 0:
        return "a network namespace for the device needs root"
    missing = [p for p in (str(SSHD), "ip", "ssh", "ssh-keygen") if shutil.which(p) is None]
    if missing:
        return f"needs {', '.join(missing)} (`make test` installs openssh-server as root)"
    return None


def _binfmt_enabled() -> bool:
    """An enabled qemu-aarch64 entry whose interpreter exists, opened at registration (the F
    flag), so that it also runs programs inside a chroot that does not hold it."""
    try:
        lines = _QEMU_AARCH64.read_text().splitlines()
    except OSError:
        return False
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    return (lines[:1] == ["enabled"] and Path(fields.get("interpreter", "")).exists()
            and "F" in fields.get("flags:", ""))


def why_not_arm64() -> str | None:
    """None when aarch64 programs run here through qemu-user; else the one-line reason.
    Mounts binfmt_misc and enables the qemu-aarch64 entry (binfmt-support) when it can."""
    reason = why_not_namespace()
    if reason:
        return reason
    if shutil.which("debootstrap") is None:
        return "needs debootstrap to build the arm64 userland (`make test` installs it as root)"
    if not _binfmt_enabled():
        if not (_BINFMT / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(_BINFMT)],
                           capture_output=True)
        if shutil.which("update-binfmts"):
            subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    if not _binfmt_enabled():
        detail = ("binfmt_misc is not mounted and cannot be" if not (_BINFMT / "register").exists()
                  else "no enabled qemu-aarch64 entry with the F flag")
        return (f"qemu-aarch64 cannot be registered with binfmt_misc ({detail}; install "
                f"qemu-user-static and binfmt-support, as `make test` does as root)")
    return None


def _free_subnet() -> ipaddress.IPv4Network:
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    for _ in range(100):
        third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
        net = ipaddress.IPv4Network(f"10.231.{third}.{fourth}/30")
        if f"inet {net[1]}/" not in used and f"inet {net[2]}/" not in used:
            return net
    raise AssertionError("no free 10.231.x.y/30 subnet")


@contextlib.contextmanager
def _namespace() -> Iterator[tuple[str, str, str]]:
    """(namespace, this host's address, the device's address), removed afterwards."""
    tag = secrets.token_hex(3)
    namespace, veth_host, veth_device = f"netadapt-{tag}", f"na{tag}h", f"na{tag}d"
    net = _free_subnet()
    host_ip, device_ip = str(net[1]), str(net[2])
    _sh("ip", "netns", "add", namespace)
    try:
        _sh("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_device)
        _sh("ip", "link", "set", veth_device, "netns", namespace)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", veth_host)
        _sh("ip", "link", "set", veth_host, "up")
        inside = ("ip", "netns", "exec", namespace)
        _sh(*inside, "ip", "addr", "add", f"{device_ip}/30", "dev", veth_device)
        _sh(*inside, "ip", "link", "set", veth_device, "up")
        _sh(*inside, "ip", "link", "set", "lo", "up")
        yield namespace, host_ip, device_ip
    finally:
        # Whatever runs on the "device" was started by the test: sshd and the daemon.
        out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True)
        for pid in (int(p) for p in out.stdout.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def _keys(tmp: Path, device_ip: str, port: int) -> tuple[Path, Path]:
    """(the device's host key, the ssh_config this host uses)."""
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
    _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "user_key"))
    host_key = (tmp / "host_key.pub").read_text().split()
    name = device_ip if port == 22 else f"[{device_ip}]:{port}"  # as ssh files them
    (tmp / "known_hosts").write_text(f"{name} {host_key[0]} {host_key[1]}\n")
    (tmp / "ssh_config").write_text(textwrap.dedent(f"""\
        IdentityFile {tmp}/user_key
        IdentitiesOnly yes
        UserKnownHostsFile {tmp}/known_hosts
        StrictHostKeyChecking yes
        """))
    return tmp / "host_key", tmp / "ssh_config"


def _sshd_config(address: str, port: int, host_key: str, pid_file: str,
                 authorized_keys: str) -> str:
    return textwrap.dedent(f"""\
        ListenAddress {address}
        Port {port}
        HostKey {host_key}
        PidFile {pid_file}
        AuthorizedKeysFile {authorized_keys}
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        StrictModes no
        UsePAM no
        PrintMotd no
        """)


def _wait_for_sshd(host: DeviceHost, sshd: subprocess.Popen[bytes], log: Path,
                   timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (probe := host.ssh("true", timeout_s=30)).returncode != 0:
        if sshd.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the device's sshd did not start: {probe.stderr}\n"
                                 f"{log.read_text(errors='replace')}")
        time.sleep(0.3)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(timeout=30)


@contextlib.contextmanager
def x86_host(tmp: Path, port: int = 8022) -> Iterator[DeviceHost]:
    """This machine's own file system behind a namespace: sshd on `port` (Termux's)."""
    with _namespace() as (namespace, _, device_ip):
        host_key, ssh_config = _keys(tmp, device_ip, port)
        shutil.copy(tmp / "user_key.pub", tmp / "authorized_keys")
        (tmp / "sshd_config").write_text(_sshd_config(
            device_ip, port, str(host_key), str(tmp / "sshd.pid"), str(tmp / "authorized_keys")))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation
        sshd = None
        with open(tmp / "sshd.log", "wb") as log:
            try:
                sshd = subprocess.Popen(["ip", "netns", "exec", namespace, str(SSHD), "-D", "-e",
                                         "-f", str(tmp / "sshd_config")], stderr=log)
                host = DeviceHost(namespace, device_ip, port, ssh_config, Path("/"))
                _wait_for_sshd(host, sshd, tmp / "sshd.log", 20)
                yield host
            finally:
                _stop(sshd)


def arm64_userland(cache: Path, mirror: str | None = None,
                   timeout_s: float = 1800) -> tuple[Path, float]:
    """The arm64 Debian userland under `cache`, built with debootstrap when missing (one build
    at a time, under a lock; a half-built one is never used). Returns (rootfs, build seconds,
    0 when it was there already).

    Raises:
        AssertionError: debootstrap failed; the message has the end of its log.
    """
    key = f"{ARM64_SUITE}-{'-'.join(ARM64_PACKAGES)}"
    base = cache / "arm64-userland"
    rootfs, stamp = base / "rootfs", base / "complete"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text().strip() == key and rootfs.is_dir():
            return rootfs, 0.0
        t0 = time.monotonic()
        building = base / "rootfs.building"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(rootfs, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        mirror = mirror or os.environ.get("NETADAPT_DEBIAN_MIRROR",
                                          "http://deb.debian.org/debian")
        command = ["debootstrap", "--arch=arm64", "--variant=minbase",
                   f"--include={','.join(ARM64_PACKAGES)}", ARM64_SUITE, str(building), mirror]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            log = building / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else done.stderr[-2000:]
            raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
        building.rename(rootfs)
        stamp.write_text(key + "\n")
        return rootfs, time.monotonic() - t0


@contextlib.contextmanager
def arm64_host(tmp: Path, rootfs: Path, port: int = 22) -> Iterator[DeviceHost]:
    """The arm64 userland as a board: its own sshd (aarch64, under qemu-user) in a chroot with
    its own mount and pid namespaces, behind a network namespace. `files` is the overlay's
    upper directory: what the device wrote, seen from here."""
    upper, work, merged = tmp / "upper", tmp / "work", tmp / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    with _namespace() as (namespace, _, device_ip):
        host_key, ssh_config = _keys(tmp, device_ip, port)
        (upper / "root" / ".ssh").mkdir(parents=True, mode=0o700)
        shutil.copy(tmp / "user_key.pub", upper / "root" / ".ssh" / "authorized_keys")
        (upper / "etc" / "ssh").mkdir(parents=True)
        shutil.copy(host_key, upper / "etc" / "ssh" / "netadapt_host_key")
        (upper / "run" / "sshd").mkdir(parents=True)
        (upper / "etc" / "ssh" / "netadapt_sshd_config").write_text(_sshd_config(
            device_ip, port, "/etc/ssh/netadapt_host_key", "/run/sshd.pid",
            ".ssh/authorized_keys"))
        boot = (f"mount -t overlay overlay -o lowerdir={rootfs},upperdir={upper},workdir={work} "
                f"{merged} && mount -t proc proc {merged}/proc && "
                f"mount --rbind /dev {merged}/dev && "
                f"exec chroot {merged} /usr/sbin/sshd -D -e -f /etc/ssh/netadapt_sshd_config")
        sshd = None
        with open(tmp / "sshd.log", "wb") as log:
            try:
                # --kill-child: when unshare goes, so does the namespace's init (sshd) and with
                # it every process of the device.
                sshd = subprocess.Popen(
                    ["ip", "netns", "exec", namespace, "unshare", "--mount",
                     "--propagation", "private", "--pid", "--fork", "--kill-child",
                     "sh", "-c", boot], stderr=log)
                host = DeviceHost(namespace, device_ip, port, ssh_config, upper)
                _wait_for_sshd(host, sshd, tmp / "sshd.log", 120)
                yield host
            finally:
                _stop(sshd)
                # The board's writes (a venv of ~200 MB); its mounts went with its namespace.
                shutil.rmtree(upper, ignore_errors=True)
                shutil.rmtree(work, ignore_errors=True)


def native_pids(host: DeviceHost, needle: bytes) -> list[int]:
    """This host's pids of the device's processes whose command line holds `needle`."""
    found = []
    for pid in host.pids():
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found


def maps_of(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text(errors="replace")

