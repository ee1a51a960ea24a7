"""`netadapt-deploy`: put the measurement daemon on a device, see whether it runs, stop it.

    netadapt-deploy deploy --device ssh://USER@HOST[:PORT] [--bind ADDR] [--port 50051] …
    netadapt-deploy deploy --device adb[:SERIAL]
    netadapt-deploy status --device …
    netadapt-deploy stop --device …
    netadapt-deploy wheels --platform aarch64 [--python-version 3.11] [--out DIR]

A deploy is idempotent: the second one updates the code and restarts the daemon, keeping the
token. Errors are one line on stderr (then the device's log, when there is one): exit 2 for a
wrong command line, 1 when the device could not be reached or the daemon did not come up;
`status` exits 3 when the daemon is not serving.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from device_server.cpu_topology import format_cpu_list, parse_cpu_list
from host.cli.common import (
    EXIT_DEVICE,
    EXIT_NOT_SERVING,
    EXIT_USAGE,
    CliParser,
    add_threads_option,
    parse_command_line,
)
from host.deploy import wheels
from host.deploy.adb import AdbError
from host.deploy.bundle import BundleError, device_requirements
from host.deploy.deployer import (
    DEFAULT_PORT,
    DEFAULT_REMOTE_DIR,
    ConfigError,
    DeployConfig,
    DeployError,
    DeployResult,
    deploy,
    status,
    stop,
)
from host.deploy.ssh import RemoteError, SshError, SshOptions
from host.deploy.target import DEVICE_FORMS, TargetError, parse_device
from host.deploy.tokens import netadapt_home

__all__ = ["main", "build_parser", "usage_lines"]

PROG = "netadapt-deploy"


_Parser = CliParser


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port 1..65535, got {text!r}")
    return int(text)


def _cpus(text: str) -> str:
    try:
        return format_cpu_list(parse_cpu_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ssh_option(text: str) -> str:
    if "=" not in text and " " not in text:
        raise argparse.ArgumentTypeError(f"expected an ssh option Key=Value, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0],
                     epilog="Exit codes: 0 ok, 1 device error, 2 bad command line, "
                            "3 (status) not serving.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_ in (("deploy", "install or update the daemon on the device and start it"),
                        ("status", "say whether the daemon runs there and serves for this host"),
                        ("stop", "stop the daemon on the device")):
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--device", required=True, metavar="DEVICE", help=DEVICE_FORMS)
        p.add_argument("--remote-dir", default=DEFAULT_REMOTE_DIR,
                       help=f"where it lives on the device (default {DEFAULT_REMOTE_DIR})")
        p.add_argument("-i", "--identity", metavar="KEY", help="ssh private key")
        p.add_argument("--ssh-config", metavar="FILE", help="ssh configuration file (ssh -F)")
        p.add_argument("--ssh-option", type=_ssh_option, action="append", default=[],
                       metavar="KEY=VALUE", help="an ssh -o option; repeat for more")
        p.add_argument("--address", metavar="HOST:PORT",
                       help="how this host reaches the daemon (default: the ssh host and --port; "
                            "over adb a forwarded loopback port)")
        p.add_argument("-v", "--verbose", action="store_true", help="log each step")
        if name == "deploy":
            p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                           help=f"the daemon's port on the device (default {DEFAULT_PORT})")
            p.add_argument("--bind", metavar="ADDR",
                           help="the daemon's bind address on the device (default 0.0.0.0 over "
                                "ssh, 127.0.0.1 over adb)")
            p.add_argument("--local-port", type=_port,
                           help="adb: the host port forwarded to the daemon (default --port)")
            add_threads_option(p)  # the daemon's default: what a request without one gets
            p.add_argument("--cpus", type=_cpus, metavar="LIST",
                           help="pin the daemon to these CPUs, e.g. 4-7 for a phone's big "
                                "cores (netadapt-bench info lists the clusters)")
            p.add_argument("--python", default="", metavar="PATH",
                           help="the device's Python >= 3.11 to build the venv from "
                                "(default python3 on its PATH; on Termux, pkg's python)")
            p.add_argument("--wheelhouse", type=Path, metavar="DIR",
                           help="install from the .whl files in DIR (for a device without "
                                "internet; `make device-wheels PLATFORM=aarch64` builds it)")
            p.add_argument("--download-wheels", action="store_true",
                           help="download the device's wheels on this host for its machine, "
                                "Python and glibc, and install from them (a device without "
                                "internet, a host with it)")
            p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                           help="how long this host waits for the daemon to answer "
                                "(default 30)")
    w = sub.add_parser("wheels", help="download the device's wheels for a device offline",
                       description="Downloads the daemon's Python packages as wheels for the "
                                   "device's platform, to install with deploy --wheelhouse.")
    w.add_argument("--platform", required=True, metavar="MACHINE",
                   help="the device's `uname -m`: aarch64 (arm64) or x86_64")
    w.add_argument("--python-version", default=wheels.DEFAULT_PYTHON, metavar="X.Y",
                   help=f"the device's Python (default {wheels.DEFAULT_PYTHON})")
    w.add_argument("--glibc", default=wheels.DEFAULT_GLIBC, metavar="X.Y",
                   help=f"the device's glibc, `ldd --version` (default {wheels.DEFAULT_GLIBC}: "
                        f"wheels that install on any newer one)")
    w.add_argument("--out", type=Path, metavar="DIR",
                   help="where to put them (default device-wheels/linux-MACHINE-pyX.Y-glibcX.Y)")
    w.add_argument("-v", "--verbose", action="store_true", help="log each step")
    return parser


def _config(args: argparse.Namespace) -> DeployConfig:
    ssh = SshOptions(identity=args.identity, config=args.ssh_config,
                     options=tuple(args.ssh_option))
    config = DeployConfig(remote_dir=args.remote_dir, address=args.address, ssh=ssh)
    if args.command != "deploy":
        return config
    return replace(config, port=args.port, bind=args.bind, threads=args.threads,
                   cpus=args.cpus or "", python=args.python, wheelhouse=args.wheelhouse,
                   download_wheels=args.download_wheels, local_port=args.local_port,
                   ready_timeout_s=args.timeout)


def usage_lines(result: DeployResult) -> list[str]:
    """The commands that use the deployed daemon, ready to paste."""
    device = (f"--device {shlex.quote(result.address)} "
              f"--token-file {shlex.quote(str(result.token_file))}")
    return [f"netadapt-host adapt {device}", f"netadapt-bench {device} info"]


def _report_deploy(result: DeployResult, out: TextIO) -> None:
    replaced = f", replacing pid {result.previous_pid}" if result.previous_pid else ""
    env = "installed" if result.env_installed else "already current"
    token = "new" if result.token_created else "kept"
    pinned = f", pinned to cpu{result.pinned}" if result.pinned else ""
    source = f" from {result.wheelhouse}" if result.env_installed and result.wheelhouse else ""
    out.write(f"deployed to {result.target} ({result.platform}): daemon pid {result.pid}"
              f"{replaced}, serving at {result.address}{pinned}\n"
              f"  device: {result.device}\n"
              f"  device fingerprint {result.fingerprint}; Python packages {env}{source}\n"
              f"  token ({token}): {result.token_file}\n"
              "use it with:\n")
    for line in usage_lines(result):
        out.write(f"  {line}\n")
    if result.over_adb:
        out.write(f"  (through an adb port forward: after replugging the phone, "
                  f"`make device-status DEVICE={result.target}` sets it up again)\n")


def _wheels(args: argparse.Namespace, out: TextIO) -> int:
    target = wheels.parse_target(args.platform, args.python_version, args.glibc)
    folder = args.out or Path("device-wheels") / target.folder_name()
    out.write(f"downloading the device's wheels ({target.describe()}) to {folder}\n")
    out.flush()
    try:
        found = wheels.download(target, folder, device_requirements())
    except wheels.WheelError as exc:
        raise _DownloadError(str(exc)) from None
    size_mb = sum(w.stat().st_size for w in found) / 1e6
    out.write(f"{len(found)} wheels ({size_mb:.0f} MB) in {folder}\n"
              f"deploy with: make deploy-device DEVICE=ssh://USER@HOST "
              f"DEPLOY_ARGS='--wheelhouse {shlex.quote(str(folder))}'\n")
    return 0


class _DownloadError(RuntimeError):
    """pip could not fetch the wheels (network, index): a failure, not a bad command line."""


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "wheels":
        return _wheels(args, out)
    target = parse_device(args.device)
    config = _config(args)
    if args.command == "deploy":
        def progress(message: str) -> None:
            out.write(f"{message}\n")
            out.flush()

        result = deploy(target, config, netadapt_home(), progress)
        _report_deploy(result, out)
        return 0
    if args.command == "stop":
        pid = stop(target, config)
        out.write(f"stopped the daemon on {target} (pid {pid})\n" if pid
                  else f"no daemon was running on {target}\n")
        return 0
    st = status(target, config)
    if not st.running:
        out.write(f"{target}: stopped\n")
        return EXIT_NOT_SERVING
    health = "SERVING" if st.serving else f"not serving for this host ({st.detail})"
    out.write(f"{target}: running (pid {st.pid}), {st.address}: {health}\n")
    if args.verbose or not st.serving:
        out.writelines(f"  | {line}\n" for line in st.log_tail)
    return 0 if st.serving else EXIT_NOT_SERVING


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Runs the command line; returns the exit code (never raises for bad input)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_command_line(build_parser(), argv, err)
    if isinstance(args, int):
        return args
    if not args.verbose:
        # The token goes over plaintext by design here (bound by --bind, a private network or
        # an adb/ssh tunnel); the client's per-connection warning would only repeat that.
        logging.getLogger("host.device.client").setLevel(logging.ERROR)
    try:
        return _run(args, out)
    except (TargetError, ConfigError, wheels.WheelError) as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except (SshError, AdbError, RemoteError, DeployError, BundleError, _DownloadError) as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_DEVICE
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted\n")
        return 130
    except OSError as exc:  # writing the host's token file
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_DEVICE


if __name__ == "__main__":
    sys.exit(main())
