"""`netadapt-deploy` for real, without a phone: a second host made with a network namespace
(its own address behind a veth pair) runs sshd; the daemon is deployed there over ssh into a
virtual environment without torch, measured from this host, re-deployed, and stopped.

The adb path is the ssh path after `adb forward`; adb itself needs a phone, so its command
lines are tested with a stand-in `adb` that records them. The Termux branch of the device
script is run with a stand-in `pkg`.

The namespace test needs root, `ip` and OpenSSH (`make test` installs openssh-server where it
can); without them it is skipped with the reason. The device's packages are downloaded by this
host for the device's machine, Python and glibc (`--download-wheels`, through pip's cache): the
namespace has no route to the internet, like many phones on a lab network.
tests/test_deploy_arm.py does the same on an aarch64 userland.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from host.cli import netadapt_bench as bench_cli
from host.cli.netadapt_deploy import main
from host.deploy import adb, wheels
from host.deploy.bundle import (
    MANIFEST_NAME,
    REQUIREMENTS_NAME,
    BundleError,
    build_bundle,
    device_requirements,
)
from host.deploy.deployer import DeployConfig, _endpoint
from host.deploy.remote import TERMUX_PACKAGES, RemoteSettings, parse_report, render_script
from host.deploy.ssh import SshOptions, ssh_command
from host.deploy.target import AdbTarget, SshTarget, TargetError, parse_device
from host.deploy.tokens import read_host_token, token_path, write_host_token
from host.device.client import DeviceClient, DeviceError
from tests.helpers_device_hosts import DeviceHost, why_not_namespace, x86_host
from tests.test_daemon_process import NO_TORCH

ROOT = Path(__file__).resolve().parents[1]
DEVICE_SSH_PORT = 8022  # as Termux's sshd
DAEMON_PORT = 50051


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


# -- targets -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ssh://u0_a123@192.168.1.5:8022", SshTarget("192.168.1.5", 8022, "u0_a123")),
        ("ssh://pi@raspberrypi.local", SshTarget("raspberrypi.local", 22, "pi")),
        ("ssh://board", SshTarget("board", 22, None)),
        ("ssh://root@[fe80::1]:2222", SshTarget("fe80::1", 2222, "root")),
        ("ssh://[::1]", SshTarget("::1", 22, None)),
        ("adb", AdbTarget()),
        ("adb:R58M123ABC", AdbTarget(serial="R58M123ABC")),
        ("adb:192.168.1.5:5555", AdbTarget(serial="192.168.1.5:5555")),
    ],
)
def test_device_forms_parse(text: str, expected: object) -> None:
    assert parse_device(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no device given"),
        ("192.168.1.5", "expected ssh://"),
        ("http://host", "expected ssh://"),
        ("ssh://", "not a host name"),
        ("ssh://user@", "not a host name"),
        ("ssh://host:0", "port must be 1..65535"),
        ("ssh://host:99999", "port must be 1..65535"),
        ("ssh://host:ssh", "port must be 1..65535"),
        ("ssh://bad user@host", "not a user name"),
        ("ssh://ho st", "not a host name"),
        ("ssh://[::1", "expected [IPV6]"),
        ("adb:", "adb:SERIAL"),
        ("adb:bad serial", "adb:SERIAL"),
    ],
)
def test_bad_device_forms_say_what_is_expected(text: str, message: str) -> None:
    with pytest.raises(TargetError, match=re.escape(message)):
        parse_device(text)


def test_target_keys_are_file_names() -> None:
    assert SshTarget("10.0.0.2", 8022, "u0_a1").key == "u0_a1@10.0.0.2_8022"
    assert SshTarget("fe80::1", 22).key == "fe80__1_22"
    assert AdbTarget("192.168.1.5:5555").key == "adb_192.168.1.5_5555"
    assert AdbTarget().key == "adb_default"


def test_cli_usage_errors_are_one_line_without_traceback(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    code, out, err = run_cli("deploy", "--device", "http://phone")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "expected ssh://" in err and "Traceback" not in err
    code, _, _ = run_cli("deploy", "--device", "adb", "--port", "70000")
    err = capsys.readouterr().err  # argparse's own message
    assert code == 2 and err.count("\n") == 1 and "1..65535" in err
    code, _, err = run_cli("deploy", "--device", "ssh://h", "--bind", "127.0.0.1")
    assert code == 2 and "loopback" in err and err.count("\n") == 1
    code, _, err = run_cli("deploy", "--device", "ssh://h", "--wheelhouse", "/nonexistent")
    assert code == 2 and "not a directory" in err
    code, _, err = run_cli("deploy", "--device", "ssh://h", "--wheelhouse", "/tmp",
                           "--download-wheels")
    assert code == 2 and "exclude each other" in err and err.count("\n") == 1
    code, _, _ = run_cli("deploy", "--device", "ssh://h", "--cpus", "7-4")
    err = capsys.readouterr().err
    assert code == 2 and "not a CPU list: '7-4'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--platform", "armv7l"], "no onnxruntime wheels for 32-bit ARM"),
        (["--platform", "termux"], "Termux installs numpy, grpcio and onnxruntime with pkg"),
        (["--platform", "sparc64"], "expected aarch64 (arm64) or x86_64"),
        (["--platform", "aarch64", "--python-version", "3"], "not a version like 3.11"),
        (["--platform", "aarch64", "--glibc", "two"], "not a version like 2.28"),
    ],
)
def test_wheels_command_refuses_what_pypi_cannot_serve(argv: list[str], message: str) -> None:
    code, out, err = run_cli("wheels", *argv)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err


def test_wheel_tags_for_a_device() -> None:
    target = wheels.parse_target("arm64", "3.11", "2.28")
    tags = target.platform_tags()
    assert tags[0] == "manylinux_2_28_aarch64" and tags[-1] == "manylinux2014_aarch64"
    assert "manylinux_2_17_aarch64" in tags and "manylinux_2_29_aarch64" not in tags
    assert target.python_tag == "cp311"
    assert wheels.parse_target("amd64", "3.12", "2.17").platform_tags()[-3:] == [
        "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]


def test_ssh_command_line() -> None:
    target = SshTarget("10.0.0.2", 8022, "u0_a1")
    options = SshOptions(identity="/k", config="/c", options=("BatchMode=no",))
    cmd = ssh_command(target, options, "sh -s")
    assert cmd[:8] == ["ssh", "-T", "-p", "8022", "-F", "/c", "-i", "/k"]
    # ssh takes the first value of an option: the user's must come before the defaults
    assert cmd.index("BatchMode=no") < cmd.index("BatchMode=yes")
    assert cmd[-3:] == ["--", "u0_a1@10.0.0.2", "sh -s"]


# -- adb: command lines only (running them needs a phone) -------------------------------------
def test_adb_command_lines() -> None:
    assert adb.forward_command(None, 0, 8022) == ["adb", "forward", "tcp:0", "tcp:8022"]
    assert adb.forward_command("R58M", 50051, 50051) == [
        "adb", "-s", "R58M", "forward", "tcp:50051", "tcp:50051"]
    assert adb.remove_forward_command("R58M", 41234) == [
        "adb", "-s", "R58M", "forward", "--remove", "tcp:41234"]


@pytest.fixture()
def fake_adb(tmp_path: Path) -> tuple[str, Path]:
    """An `adb` that records its arguments and answers `forward tcp:0` with a port."""
    calls = tmp_path / "adb-calls"
    program = tmp_path / "adb"
    program.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$*" >>{calls}
        case "$*" in
          *"more-than-one"*) echo "adb: error: more than one device/emulator" >&2; exit 1 ;;
          *"forward tcp:0 "*) echo 41234 ;;
        esac
        """))
    program.chmod(0o755)
    return str(program), calls


def test_adb_forward_returns_the_port_adb_picked(fake_adb: tuple[str, Path]) -> None:
    program, calls = fake_adb
    assert adb.forward("R58M", 0, 8022, program) == 41234
    assert adb.forward(None, 50051, 50051, program) == 50051
    assert calls.read_text().splitlines() == ["-s R58M forward tcp:0 tcp:8022",
                                              "forward tcp:50051 tcp:50051"]
    with pytest.raises(adb.AdbError, match="more than one device.*DEVICE=adb:SERIAL"):
        adb.forward("more-than-one", 0, 8022, program)
    with pytest.raises(adb.AdbError, match="install Android platform-tools"):
        adb.forward(None, 0, 8022, "/nonexistent/adb")


def test_adb_target_becomes_an_ssh_target_on_a_forwarded_port(fake_adb: tuple[str, Path]
                                                              ) -> None:
    program, calls = fake_adb
    config = DeployConfig(adb_program=program, local_port=50100)
    with _endpoint(AdbTarget("R58M"), config) as endpoint:
        assert endpoint.ssh == SshTarget("127.0.0.1", 41234, None)
        assert endpoint.ssh_options.options == (  # the port changes; the phone's key does not
            "HostKeyAlias=netadapt-adb_R58M", "StrictHostKeyChecking=accept-new")
        assert endpoint.over_adb
        assert endpoint.address(50051) == "127.0.0.1:50100"
    assert calls.read_text().splitlines() == [
        "-s R58M forward tcp:0 tcp:8022",          # the phone's sshd, for the deploy only
        "-s R58M forward tcp:50100 tcp:50051",     # the daemon, kept for the host's runs
        "-s R58M forward --remove tcp:41234",
    ]


# -- the bundle ----------------------------------------------------------------------------
def test_bundle_holds_the_device_side_and_no_torch() -> None:
    bundle = build_bundle()
    assert bundle.files == tuple(sorted(bundle.files))
    assert {f.split("/")[0] for f in bundle.files} == {
        "device_server", "protos", REQUIREMENTS_NAME, MANIFEST_NAME}
    assert {"device_server/__main__.py", "device_server/server.py", "protos/device_pb2.py",
            "protos/device_pb2_grpc.py", "protos/device.proto"} <= set(bundle.files)
    assert not any(f.startswith(("host/", "lut/", "tests/")) for f in bundle.files)
    assert not any("torch" in r.lower() for r in bundle.requirements)
    assert "protobuf>=7.35.1,<8" in bundle.requirements  # the generated code checks it
    assert {r.split(">")[0] for r in bundle.requirements} >= {
        "grpcio", "grpcio-health-checking", "onnx", "onnxruntime", "numpy"}
    assert build_bundle().sha256 == bundle.sha256, "the same sources must give the same bundle"


def test_bundle_refuses_torch_and_missing_generated_code(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["numpy", "torch>=2"]\n')
    with pytest.raises(BundleError, match="host-only packages: torch"):
        device_requirements(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = []\n')
    for package in ("device_server", "protos"):
        (tmp_path / package).mkdir()
    (tmp_path / "protos" / "device.proto").write_text("")
    with pytest.raises(BundleError, match="make protos"):
        build_bundle(tmp_path)


# -- the device script ---------------------------------------------------------------------
def _run_script(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-s"], input=script, capture_output=True, text=True,
                          env=env, timeout=60)


def test_script_quotes_settings_and_probes_an_empty_device(tmp_path: Path) -> None:
    odd = tmp_path / "it's a $dir; `rm -rf` x"
    settings = RemoteSettings(remote_dir=str(odd), python="/no such/python", token="t'$x")
    done = _run_script(render_script(("probe",), settings))
    assert done.returncode == 0, done.stderr
    report = parse_report(done.stdout)
    libc = report.values.pop("libc", "")  # what the wheels must fit, where getconf says
    assert report.values == {"platform": "linux", "machine": os.uname().machine,
                             "env": "stale", "token": "absent"}  # no Python: none probed
    assert libc == "" or libc.startswith("glibc ")
    probe = parse_report(_run_script(render_script(
        ("probe",), RemoteSettings(remote_dir=str(odd), python=sys.executable))).stdout)
    assert probe.get("python") == "{}.{}".format(*sys.version_info[:2])
    done = _run_script(render_script(("write_token", "read_token", "probe"), settings))
    assert done.returncode == 0, done.stderr
    assert parse_report(done.stdout).get("token_value") == "t'$x"
    assert stat.S_IMODE((odd / "token").stat().st_mode) == 0o600
    done = _run_script(render_script(("install",), settings))
    assert done.returncode == 3
    assert "netadapt-error: /no such/python is not Python >= 3.11" in done.stderr


def test_termux_gets_its_python_packages_from_pkg(tmp_path: Path) -> None:
    """On Termux the packaged builds are installed (pip's manylinux wheels do not install
    there); a stand-in `pkg` records the command and fails, as with no network."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "pkg-calls"
    (bin_dir / "pkg").write_text(f'#!/bin/sh\necho "$*" >>{calls}\necho "no network" >&2\n'
                                 f"exit 100\n")
    (bin_dir / "dpkg").write_text("#!/bin/sh\nexit 1\n")  # nothing installed yet
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PREFIX": "/data/data/com.termux/files/usr"}
    settings = RemoteSettings(remote_dir=str(tmp_path / "dev"))
    probe = _run_script(render_script(("probe",), settings), env)
    assert parse_report(probe.stdout).get("platform") == "termux"
    done = _run_script(render_script(("install",), settings), env)
    assert done.returncode == 3
    assert "pkg install " + " ".join(TERMUX_PACKAGES) + " failed" in done.stderr
    assert "no network" in done.stderr  # the log's tail comes with the error
    assert calls.read_text().split() == ["install", "-y", *TERMUX_PACKAGES]


def test_deploy_tool_imports_no_torch() -> None:
    code = NO_TORCH + "import host.cli.netadapt_deploy\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_host_token_file_is_private(tmp_path: Path) -> None:
    path = token_path(tmp_path / "home", "u@h_22")
    write_host_token(path, "secret")
    assert read_host_token(path) == "secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert read_host_token(tmp_path / "missing.token") is None


# -- a second host: network namespace + sshd ---------------------------------------------------
@pytest.fixture(scope="module")
def device_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeviceHost]:
    reason = why_not_namespace()
    if reason:
        pytest.skip(reason)
    with x86_host(tmp_path_factory.mktemp("device-host"), DEVICE_SSH_PORT) as host:
        yield host


def _measure(address: str, token_file: Path) -> float:
    out, err = io.StringIO(), io.StringIO()
    code = bench_cli.main(["--device", address, "--token-file", str(token_file), "--json",
                           "--repeat", "5", "--warmup", "2", "conv2d", "--cin", "8", "--cout",
                           "8", "-k", "3", "--hw", "8"], out, err)
    assert code == 0, err.getvalue()
    return float(json.loads(out.getvalue())["timing"]["median_ms"])


def _daemon_pid(remote: Path) -> int:
    return int((remote / "daemon.pid").read_text())


def _alive(pid: int) -> bool:
    """A running daemon (a zombie left for an init that does not reap has no command line)."""
    try:
        return b"device_server" in (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False


def _not_serving(address: str) -> bool:
    try:
        with DeviceClient(address, timeout_s=2.0, retries=0) as client:
            client.wait_ready(timeout_s=2.0)
    except DeviceError:
        return True
    return False


def test_deploy_measure_redeploy_stop_on_a_second_host(
    device_host: DeviceHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETADAPT_HOME", str(tmp_path / "home"))
    remote = tmp_path / "on-device"  # the namespace shares the file system; not the network
    device = f"ssh://root@{device_host.address}:{DEVICE_SSH_PORT}"
    common = ["--device", device, "--ssh-config", str(device_host.ssh_config),
              "--remote-dir", str(remote)]
    address = f"{device_host.address}:{DAEMON_PORT}"
    token_file = tmp_path / "home" / "devices" / f"root@{device_host.address}_8022.token"
    device_python = str(Path(sys.base_prefix) / "bin" / "python3")  # not this venv: no torch

    # First deploy: the device's wheels fetched here for its machine, Python and glibc (the
    # namespace has no route to the internet), a venv from them, a new token, the daemon
    # started and pinned to CPU 0.
    code, out, err = run_cli("deploy", *common, "--python", device_python, "--download-wheels",
                             "--cpus", "0")
    assert code == 0, err
    assert "token (new)" in out and "Python packages installed from" in out
    assert f"serving at {address}, pinned to cpu0\n" in out
    assert re.search(rf"  device: {os.uname().machine} Linux.*: \d+x ", out), out
    assert (f"netadapt-host adapt --device {address} --token-file {token_file}\n") in out
    token = token_file.read_text().strip()
    assert len(token) >= 40 and (remote / "token").read_text().strip() == token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((remote / "token").stat().st_mode) == 0o600
    first_pid = _daemon_pid(remote)
    ns = subprocess.run(["ip", "netns", "identify", str(first_pid)], capture_output=True,
                        text=True).stdout.strip()
    assert ns == device_host.namespace, "the daemon must run on the second host"

    # The device's environment has what the daemon needs and no torch; no host code either.
    venv_python = remote / "venv" / "bin" / "python"
    no_torch = device_host.ssh(f"{venv_python} -c 'import torch'")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    assert device_host.ssh(f"{venv_python} -c 'import onnxruntime, grpc, onnx'").returncode == 0
    assert "include-system-site-packages = false" in (remote / "venv" / "pyvenv.cfg").read_text()
    assert not (remote / "app" / "host").exists()

    # The wheels fit this device and no other.
    fetched = next((tmp_path / "home" / "wheels").iterdir())
    python = "{}.{}".format(*sys.version_info[:2])
    glibc = fetched.name.rsplit("glibc", 1)[1]
    assert fetched.name == f"linux-{os.uname().machine}-py{python}-glibc{glibc}"
    assert wheels.mismatches(fetched, os.uname().machine, python, glibc) == []
    other = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    binary = [w.name for w in fetched.glob("*.whl") if not w.name.endswith("-none-any.whl")]
    assert binary and len(wheels.mismatches(fetched, other, python, glibc)) == len(binary)
    assert all(f"(for {os.uname().machine})" in m
               for m in wheels.mismatches(fetched, other, python, glibc))
    assert any("needs glibc" in m for m in wheels.mismatches(fetched, os.uname().machine,
                                                              python, "2.5"))

    # A layer measured through the deployed daemon, from this host over the veth pair; it
    # says where it is pinned.
    assert _measure(address, token_file) > 0
    with DeviceClient(address, token=token, timeout_s=10) as client:
        assert client.device_info().pinned_cpus == (0,)
    with DeviceClient(address, timeout_s=10, retries=0) as anonymous:
        with pytest.raises(DeviceError, match="UNAUTHENTICATED"):
            anonymous.device_info()

    # Second deploy: the code updated, the daemon restarted (not pinned now), the token and
    # packages kept.
    code, out, err = run_cli("deploy", *common)
    assert code == 0, err
    assert "token (kept)" in out and "already current" in out and "pinned" not in out
    assert f"replacing pid {first_pid}" in out
    second_pid = _daemon_pid(remote)
    assert second_pid != first_pid
    assert not _alive(first_pid), "the old daemon must be gone"
    assert token_file.read_text().strip() == token == (remote / "token").read_text().strip()
    assert _measure(address, token_file) > 0

    code, out, err = run_cli("status", *common)
    assert (code, err) == (0, "")
    assert f"running (pid {second_pid}), {address}: SERVING" in out

    # A host without the token file (another machine, or a lost file) gets the device's.
    token_file.unlink()
    code, out, err = run_cli("deploy", *common)
    assert code == 0, err
    assert "token (kept)" in out and token_file.read_text().strip() == token
    third_pid = _daemon_pid(remote)
    assert third_pid != second_pid

    code, out, err = run_cli("stop", *common)
    assert code == 0, err
    assert f"(pid {third_pid})" in out
    assert _not_serving(address)
    code, out, _ = run_cli("status", *common)
    assert code == 3 and "stopped" in out

    # A daemon that cannot pin to the CPUs asked for fails the deploy with the device's log.
    code, out, err = run_cli("deploy", *common, "--cpus", "4095")
    assert code == 1 and "exited before serving" in err
    assert "cannot pin to CPUs [4095]" in err and "  | " in err

    # A daemon that cannot start (its port is sshd's) fails the deploy with the device's log.
    code, out, err = run_cli("deploy", *common, "--port", str(DEVICE_SSH_PORT))
    assert code == 1
    assert err.startswith("netadapt-deploy: error: ") and "exited before serving" in err
    assert "bind" in err.lower() and "  | " in err  # the log's tail
    code, out, _ = run_cli("status", *common)
    assert code == 3


def test_unreachable_device_is_one_line(device_host: DeviceHost, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETADAPT_HOME", str(tmp_path / "home"))
    code, out, err = run_cli("status", "--device", f"ssh://root@{device_host.address}:2222",
                             "--ssh-config", str(device_host.ssh_config))
    assert code == 1
    assert err.count("\n") == 1 and "Connection refused" in err and "sshd" in err
    code, out, err = run_cli("status", "--device", f"ssh://nosuchuser@{device_host.address}:8022",
                             "--ssh-config", str(device_host.ssh_config))
    assert code == 1 and err.count("\n") == 1  # BatchMode: refused, never a password prompt
    assert "Permission denied" in err and "ssh-copy-id -p 8022" in err
    assert not (tmp_path / "home").exists(), "a failed connection must not leave a token"
