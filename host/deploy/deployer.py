"""Deploy, inspect and stop the daemon on a device: the steps, in order, over ssh.

A deploy is one ssh call that probes the device, one that does the work (unpack the bundle,
install what is missing, write the token, restart the daemon and wait until it serves), and a
health check from this host over the network, which is the address the printed command uses.
Over adb, `adb forward` first makes the phone's sshd and daemon reachable on loopback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from device_server.cpu_topology import format_cpu_list, parse_cpu_list
from device_server.server import is_loopback
from host.deploy import adb, wheels
from host.deploy.bundle import build_bundle
from host.deploy.remote import (
    RemoteReport,
    RemoteSettings,
    parse_report,
    remote_path,
    render_script,
)
from host.deploy.ssh import SshOptions, run_ssh
from host.deploy.target import AdbTarget, SshTarget, Target
from host.deploy.tokens import new_token, read_host_token, token_path, write_host_token
from host.device.client import DeviceClient, DeviceError, DeviceInfo
from host.device.summary import device_line

__all__ = ["DeployConfig", "DeployResult", "DeviceStatus", "DeployError", "ConfigError", "deploy",
           "status",
           "stop", "DEFAULT_PORT", "DEFAULT_REMOTE_DIR"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
DEFAULT_REMOTE_DIR = "~/netadapt-device"
_INSTALL_TIMEOUT_S = 1800.0  # pkg and pip on a phone over Wi-Fi
_QUICK_TIMEOUT_S = 60.0


class DeployError(RuntimeError):
    """The daemon did not come up, or this host cannot reach it; the message says why."""


class ConfigError(ValueError):
    """The options contradict each other or name what does not exist; nothing was done."""


@dataclass(frozen=True)
class DeployConfig:
    """How to deploy. None for `bind`: all interfaces over ssh, loopback over adb."""

    port: int = DEFAULT_PORT               # the daemon's port on the device
    bind: str | None = None
    threads: int = 1                       # the daemon's default ORT intra-op threads
    cpus: str = ""                         # pin the daemon to these CPUs ("4-7"); "": no
    remote_dir: str = DEFAULT_REMOTE_DIR
    python: str = ""                       # the device's Python (default python3 on its PATH)
    wheelhouse: Path | None = None         # wheels to install from, for a device offline
    download_wheels: bool = False          # fetch the device's wheels on this host first
    address: str | None = None             # how this host reaches the daemon (default: derived)
    local_port: int | None = None          # adb: the host port forwarded to the daemon
    ready_timeout_s: float = 30.0          # for the health check from this host
    start_timeout_s: int = 120             # for the daemon to serve, on the device
    ssh: SshOptions = field(default_factory=SshOptions)
    adb_program: str = "adb"


@dataclass(frozen=True)
class DeployResult:
    target: str
    address: str                 # what to pass as --device
    token_file: Path
    token_created: bool
    platform: str                # "termux" or "linux"
    pid: int
    previous_pid: int | None     # the daemon this deploy replaced
    env_installed: bool          # False: the device's Python packages were already current
    fingerprint: str
    over_adb: bool = False
    device: str = ""             # what it is: "aarch64 Linux, <board>: 4x Cortex-A76"
    pinned: str = ""             # the CPUs the daemon is pinned to ("4-7"); "": not pinned
    wheelhouse: Path | None = None  # the wheels installed from, when any


@dataclass(frozen=True)
class DeviceStatus:
    target: str
    running: bool
    pid: int | None
    address: str | None
    serving: bool
    detail: str = ""             # why it is not serving, when it is not
    log_tail: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Endpoint:
    ssh: SshTarget
    ssh_options: SshOptions
    over_adb: bool
    reach: Callable[[int], str]  # the daemon's device port -> its address from this host

    def address(self, port: int) -> str:
        return self.reach(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(target: Target, config: DeployConfig) -> str:
    if config.bind:
        return config.bind
    return "127.0.0.1" if isinstance(target, AdbTarget) else "0.0.0.0"


@contextlib.contextmanager
def _endpoint(target: Target, config: DeployConfig) -> Iterator[_Endpoint]:
    """The ssh target, and how this host reaches the daemon. Over adb: forwards the phone's sshd
    for the body only, and the daemon's port to stay (the host measures through it)."""
    if isinstance(target, SshTarget):
        def direct(port: int) -> str:
            return config.address or _join(target.host, port)

        yield _Endpoint(target, config.ssh, over_adb=False, reach=direct)
        return

    def forwarded(port: int) -> str:
        if config.address:
            return config.address
        local = adb.forward(target.serial, config.local_port or port, port, config.adb_program)
        return _join("127.0.0.1", local)

    # The forwarded port changes each time: file the phone's host key under its own name, and
    # trust it on first use (the link is a USB cable).
    options = replace(config.ssh, options=(*config.ssh.options,
                                           f"HostKeyAlias=netadapt-{target.key}",
                                           "StrictHostKeyChecking=accept-new"))
    ssh_port = adb.forward(target.serial, 0, target.ssh_port, config.adb_program)
    try:
        yield _Endpoint(SshTarget("127.0.0.1", ssh_port, target.user), options, over_adb=True,
                        reach=forwarded)
    finally:
        adb.remove_forward(target.serial, ssh_port, config.adb_program)


def _settings(target: Target, config: DeployConfig, requirements_sha256: str = ""
              ) -> RemoteSettings:
    return RemoteSettings(remote_dir=config.remote_dir, bind=_bind(target, config),
                          port=config.port, threads=config.threads, cpus=config.cpus,
                          python=config.python,
                          requirements_sha256=requirements_sha256,
                          start_timeout_s=config.start_timeout_s)


def _run_steps(endpoint: _Endpoint, config: DeployConfig, settings: RemoteSettings,
               steps: tuple[str, ...], bundle: bytes | None = None,
               timeout_s: float = _QUICK_TIMEOUT_S,
               progress: Callable[[str], None] | None = None) -> RemoteReport:
    script = render_script(steps, settings, bundle)

    def on_line(line: str) -> None:
        if progress is not None and line.startswith("netadapt-note: "):
            progress(line[len("netadapt-note: "):])

    out = run_ssh(endpoint.ssh, endpoint.ssh_options, "sh -s", script.encode(), timeout_s, on_line)
    return parse_report(out)


def _wheelhouse_tar(path: Path) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for wheel in sorted(path.glob("*.whl")):
            tar.add(wheel, arcname=wheel.name)
    return raw.getvalue()


def _check_config(target: Target, config: DeployConfig) -> None:
    if config.cpus:
        try:
            parse_cpu_list(config.cpus)
        except ValueError as exc:
            raise ConfigError(f"--cpus: {exc}") from None
    if config.wheelhouse is not None and config.download_wheels:
        raise ConfigError("--wheelhouse and --download-wheels exclude each other: the first "
                          "installs wheels you have, the second fetches them for the device")
    if config.wheelhouse is not None and not config.wheelhouse.is_dir():
        raise ConfigError(f"--wheelhouse {config.wheelhouse} is not a directory")
    if config.wheelhouse is not None and not any(config.wheelhouse.glob("*.whl")):
        raise ConfigError(f"--wheelhouse {config.wheelhouse} holds no .whl files")
    if isinstance(target, SshTarget) and config.address is None and is_loopback(
            _bind(target, config)):
        raise ConfigError(
            f"--bind {config.bind} listens on the device's loopback only, which this host "
            f"cannot reach at {target.host}; bind 0.0.0.0 (the default), or pass --address "
            f"HOST:PORT for your own tunnel")


def _device_token(endpoint: _Endpoint, config: DeployConfig, settings: RemoteSettings,
                  probe: RemoteReport, path: Path) -> tuple[str, bool]:
    """This host's token for the device; else the device's (another host deployed it); else a
    new one. Returns (token, created)."""
    token = read_host_token(path)
    if token is not None:
        return token, False
    if probe.get("token") == "present":
        token = _run_steps(endpoint, config, settings, ("read_token",)).get("token_value")
        if token:
            write_host_token(path, token)
            log.info("copied the device's token to %s", path)
            return token, False
    token = new_token()
    write_host_token(path, token)
    return token, True


def deploy(target: Target, config: DeployConfig, home: Path,
           progress: Callable[[str], None] | None = None) -> DeployResult:
    """Ships the bundle, installs what is missing, (re)starts the daemon with the device's token
    and waits until this host sees it SERVING.

    Raises:
        ConfigError: the options contradict each other; nothing was done.
        BundleError: the bundle cannot be built here (generated protos missing).
        SshError, AdbError: the device cannot be reached.
        RemoteError: a step on the device failed (with its log).
        DeployError: the daemon serves on the device but not for this host.
    """
    _check_config(target, config)
    say = progress or (lambda _message: None)
    bundle = build_bundle()
    settings = _settings(target, config, bundle.requirements_sha256)
    path = token_path(home, target.key)
    with _endpoint(target, config) as endpoint:
        say(f"probing {target}")
        probe = _run_steps(endpoint, config, settings, ("probe",))
        wheelhouse = None
        if probe.get("env") != "current":
            wheelhouse = _wheelhouse_for(probe, config, home, bundle.requirements, say)
        token, created = _device_token(endpoint, config, settings, probe, path)
        if wheelhouse is not None:
            say(f"copying the wheels in {wheelhouse}")
            run_ssh(endpoint.ssh, endpoint.ssh_options,
                    f"mkdir -p {remote_path(config.remote_dir)} && "
                    f"cat >{remote_path(config.remote_dir)}/wheels.tar",
                    _wheelhouse_tar(wheelhouse), _INSTALL_TIMEOUT_S)
        say(f"installing on {target} and starting the daemon")
        report = _run_steps(endpoint, config, replace(settings, token=token),
                            ("unpack", "install", "write_token", "start"), bundle.data,
                            _INSTALL_TIMEOUT_S, say)
        pid = report.number("pid")
        assert pid is not None, f"the start step reported no pid: {report.values}"
        address = endpoint.address(config.port)
        info = _wait_serving(endpoint, address, config, settings, token)
        return DeployResult(
            target=str(target), address=address, token_file=path,
            token_created=created, platform=probe.get("platform", "linux"), pid=pid,
            previous_pid=report.number("stopped"),
            env_installed=report.get("env") == "installed", fingerprint=info.fingerprint,
            over_adb=endpoint.over_adb, device=device_line(info),
            pinned=format_cpu_list(info.pinned_cpus) if info.pinned else "",
            wheelhouse=wheelhouse)


def _wheelhouse_for(probe: RemoteReport, config: DeployConfig, home: Path,
                    requirements: tuple[str, ...], say: Callable[[str], None]) -> Path | None:
    """The wheels to send: `--wheelhouse` once it is known to fit the device, or those
    `--download-wheels` fetched for it here (kept under `home`/wheels for the next device).

    Raises:
        ConfigError: the wheels are for another machine, Python or glibc, or the device is one
            PyPI has no wheels for.
        DeployError: pip could not fetch the wheels.
    """
    if config.wheelhouse is None and not config.download_wheels:
        return None
    machine, python = probe.get("machine"), probe.get("python")
    libc = probe.get("libc")
    glibc = libc.split()[-1] if libc.startswith("glibc ") else None
    if probe.get("platform") == "termux":
        if config.download_wheels:
            raise ConfigError("--download-wheels: Termux installs numpy, grpcio and onnxruntime "
                              "with pkg; PyPI's Linux wheels do not install on Android")
        return config.wheelhouse
    if not python:
        return config.wheelhouse  # the install step says that the device has no Python
    if config.download_wheels:
        if glibc is None:
            raise ConfigError(f"--download-wheels: the device's C library is not glibc "
                              f"({libc or 'unknown'}); PyPI's manylinux wheels need glibc")
        try:
            target = wheels.parse_target(machine, python, glibc)
        except wheels.WheelError as exc:
            raise ConfigError(f"--download-wheels: {exc}") from None
        folder = home / "wheels" / target.folder_name()
        say(f"downloading the device's wheels ({target.describe()}) to {folder}")
        try:
            wheels.download(target, folder, requirements)
        except wheels.WheelError as exc:
            raise DeployError(str(exc)) from None
        return folder
    assert config.wheelhouse is not None
    bad = wheels.mismatches(config.wheelhouse, machine, python, glibc)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ConfigError(
            f"--wheelhouse {config.wheelhouse} does not fit the device ({machine}, Python "
            f"{python}, {libc or 'libc unknown'}): {bad[0]}{more}; make one with `make "
            f"device-wheels PLATFORM={machine} PYTHON_VERSION={python}` or deploy with "
            f"--download-wheels")
    return config.wheelhouse


def _wait_serving(endpoint: _Endpoint, address: str, config: DeployConfig,
                  settings: RemoteSettings, token: str) -> DeviceInfo:
    """Health SERVING from this host, then one authenticated call; returns what the device
    says it is."""
    try:
        with DeviceClient(address, timeout_s=config.ready_timeout_s) as client:
            client.wait_ready(timeout_s=config.ready_timeout_s)
        with DeviceClient(address, token=token, timeout_s=config.ready_timeout_s,
                          retries=1) as client:
            return client.device_info()
    except DeviceError as exc:
        state = _run_steps(endpoint, config, settings, ("status", "log_tail"))
        running = state.get("state") == "running"
        where = (f"the daemon runs on the device (pid {state.get('pid')}) but this host cannot "
                 f"reach it at {address}: a firewall, or the wrong --bind/--address?"
                 if running else "the daemon stopped on the device")
        tail = "".join(f"\n  | {line}" for line in state.log)
        raise DeployError(f"{where} ({exc}){tail}") from None


def status(target: Target, config: DeployConfig) -> DeviceStatus:
    """Whether the daemon runs on the device and serves for this host.

    Raises:
        SshError, AdbError: the device cannot be reached.
    """
    with _endpoint(target, config) as endpoint:
        report = _run_steps(endpoint, config, _settings(target, config), ("status", "log_tail"))
        running = report.get("state") == "running"
        port = report.number("port")
        if not running or port is None:
            return DeviceStatus(str(target), False, None, None, False, "not running",
                                report.log)
        address = endpoint.address(port)
    try:
        with DeviceClient(address, timeout_s=5.0, retries=0) as client:
            client.wait_ready(timeout_s=min(config.ready_timeout_s, 10.0))
        serving, detail = True, ""
    except DeviceError as exc:
        serving, detail = False, str(exc)
    return DeviceStatus(str(target), True, report.number("pid"), address, serving, detail,
                        report.log)


def stop(target: Target, config: DeployConfig) -> int | None:
    """Stops the daemon (SIGTERM, then SIGKILL after 15 s); returns its pid, None if none ran.

    Raises:
        SshError, AdbError: the device cannot be reached.
    """
    with _endpoint(target, config) as endpoint:
        report = _run_steps(endpoint, config, _settings(target, config), ("stop",))
    return report.number("stopped")
