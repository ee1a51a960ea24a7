"""The device half on a real ARM userland: `make deploy-device` to an aarch64 "board".

The board is an arm64 Debian 12 userland (as Raspberry Pi OS 12: Python 3.11, glibc 2.36) run
through qemu-user in its own network, mount and pid namespaces with its own aarch64 sshd
(tests/helpers_device_hosts.py). Its wheels are aarch64 wheels this host downloaded with
`make device-wheels PLATFORM=aarch64`: the board has no route to the internet. The test deploys
with `make deploy-device DEVICE=ssh://root@BOARD`, checks that the daemon runs aarch64 code,
measures a layer and a whole ONNX model through it from this host, re-deploys pinned to a core,
and stops it.

Under emulation the timings mean nothing (an x86 core pretends to be an ARM one, ~50x slower):
the test asserts what ran, and prints how long each step took. It is skipped, with one line,
where qemu-aarch64 cannot be registered with binfmt_misc or without root.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_server.server import RunningServer
from host.cli import netadapt_bench as bench_cli
from host.cli.netadapt_deploy import main as deploy_main
from host.deploy.bundle import device_requirements
from host.device.client import DeviceClient, DeviceError
from tests.helpers_device_hosts import (
    DeviceHost,
    arm64_host,
    arm64_userland,
    cache_dir,
    maps_of,
    native_pids,
    why_not_arm64,
)

ROOT = Path(__file__).resolve().parents[1]
DAEMON_PORT = 50051
MAKE_TIMEOUT_S = 900  # a cold first deploy under emulation, on two busy cores

Timings = dict[str, float]


@pytest.fixture(scope="module")
def timings(request: pytest.FixtureRequest) -> Iterator[Timings]:
    """How long each step took, printed as one line at the end (captured output is not)."""
    steps: Timings = {}
    yield steps
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin(
        "capturemanager")
    if steps and reporter is not None and capture is not None:
        line = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in steps.items())
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\naarch64 board (qemu-user): {line}")


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, timings: Timings) -> Iterator[DeviceHost]:
    reason = why_not_arm64()
    if reason:
        pytest.skip(f"aarch64 board: {reason}")
    rootfs, built_s = arm64_userland(cache_dir())
    timings["userland build" if built_s else "userland (cached)"] = built_s
    t0 = time.monotonic()
    with arm64_host(tmp_path_factory.mktemp("arm64-board"), rootfs) as host:
        timings["board boot"] = time.monotonic() - t0
        yield host


@pytest.fixture(scope="module")
def arm_wheels(board: DeviceHost, timings: Timings) -> Path:
    """The board's wheels, by the README's one command (pip's cache keeps it quick)."""
    key = hashlib.sha256("\n".join(device_requirements()).encode()).hexdigest()[:12]
    folder = cache_dir() / "wheels" / f"linux-aarch64-py3.11-{key}"
    t0 = time.monotonic()
    done = subprocess.run(["make", "-s", "device-wheels", "PLATFORM=aarch64",
                           f"WHEELS_DIR={folder}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=MAKE_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^\d+ wheels \(\d+ MB\) in ", done.stdout, re.M), done.stdout
    timings["wheels"] = time.monotonic() - t0
    return folder


def make_deploy(host: DeviceHost, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    deploy_args = " ".join(["--ssh-config", str(host.ssh_config), "--timeout", "120", *args])
    return subprocess.run(["make", "-s", "deploy-device", f"DEVICE={host.device}",
                           f"DEPLOY_ARGS={deploy_args}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=MAKE_TIMEOUT_S,
                          env={**os.environ, "NETADAPT_HOME": str(home)})


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = deploy_main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def bench(address: str, token_file: Path, *argv: str) -> dict[str, object]:
    out, err = io.StringIO(), io.StringIO()
    code = bench_cli.main(["--device", address, "--token-file", str(token_file), "--json",
                           "--repeat", "5", "--warmup", "2", *argv], out, err)
    assert code == 0, err.getvalue()
    record: dict[str, object] = json.loads(out.getvalue())
    return record


def test_wheels_for_another_machine_are_refused_before_anything_is_sent(
    board: DeviceHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETADAPT_HOME", str(tmp_path / "home"))
    x86 = tmp_path / "x86-wheels"
    code, out, err = run_cli("wheels", "--platform", "x86_64", "--out", str(x86))
    assert code == 0, err
    code, out, err = run_cli("deploy", "--device", board.device, "--ssh-config",
                             str(board.ssh_config), "--wheelhouse", str(x86))
    assert code == 2 and err.count("\n") == 1, err
    assert "does not fit the device (aarch64, Python 3.11, glibc 2.36)" in err
    assert "(for x86_64)" in err and "make device-wheels PLATFORM=aarch64" in err
    assert not (board.files / "root" / "netadapt-device").exists(), "nothing may reach the board"
    assert not (tmp_path / "home").exists(), "nor a token be made here"


def test_deploy_measure_redeploy_stop_on_an_aarch64_board(
    board: DeviceHost, arm_wheels: Path, daemon: RunningServer, timings: Timings,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("NETADAPT_HOME", str(home))
    assert board.ssh("uname -m").stdout.strip() == "aarch64"
    remote = board.files / "root" / "netadapt-device"  # what the board wrote, seen from here
    address = f"{board.address}:{DAEMON_PORT}"
    token_file = home / "devices" / f"root@{board.address}_{board.port}.token"

    # The README's command, from this host: a venv from the aarch64 wheels, a token, the daemon.
    t0 = time.monotonic()
    done = make_deploy(board, home, "--wheelhouse", str(arm_wheels))
    timings["first deploy"] = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"deployed to {board.device} (linux)" in out and f"serving at {address}" in out
    assert f"Python packages installed from {arm_wheels}" in out
    assert "  device: aarch64 Linux" in out and "token (new)" in out

    # The daemon is an aarch64 program: ld-linux-aarch64 and the aarch64 builds of CPython and
    # ONNX Runtime are mapped in the process qemu runs for it.
    daemons = native_pids(board, b"device_server")
    assert daemons, "no daemon on the board"
    maps = {pid: maps_of(pid) for pid in daemons}
    assert all("/ld-linux-aarch64.so.1" in m for m in maps.values()), maps
    assert any("onnxruntime_pybind11_state" in m for m in maps.values())
    no_torch = board.ssh("~/netadapt-device/venv/bin/python -c 'import torch'")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    assert not (remote / "app" / "host").exists() and (remote / "app" / "device_server").is_dir()

    token = token_file.read_text().strip()
    with DeviceClient(address, token=token, timeout_s=120) as client:
        info = client.device_info()
    with DeviceClient(daemon.address, timeout_s=30) as local:
        here = local.device_info()
    assert info.machine == "aarch64" and info.python_version.startswith("3.11.")
    assert info.os == "Linux" and "CPUExecutionProvider" in info.providers
    assert info.fingerprint != here.fingerprint, "an ARM board is another device than this host"

    # A layer and a whole network, measured on the board from this host.
    t0 = time.monotonic()
    layer = bench(address, token_file, "conv2d", "--cin", "16", "--cout", "32", "-k", "3",
                  "--hw", "14")
    timings["layer"] = time.monotonic() - t0
    timing = layer["timing"]
    conditions = layer["conditions"]
    assert isinstance(timing, dict) and timing["median_ms"] > 0
    assert isinstance(conditions, dict)
    assert conditions["device_fingerprint"] == info.fingerprint

    from host.graph.onnx_export import export_onnx
    from host.models.registry import build_model

    model = tmp_path / "mobilenet_v1.onnx"
    export_onnx(build_model("mobilenet_v1", width_mult=0.25, num_classes=10, in_channels=1),
                (1, 1, 28, 28), model)
    t0 = time.monotonic()
    whole = bench(address, token_file, "model", str(model))
    timings["whole model"] = time.monotonic() - t0
    assert whole["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    whole_timing = whole["timing"]
    assert isinstance(whole_timing, dict) and whole_timing["median_ms"] > 0

    # Re-deploy pinned to core 1: the code replaced, the daemon restarted, packages kept.
    first = set(daemons)
    t0 = time.monotonic()
    done = make_deploy(board, home, "--cpus", "1")
    timings["redeploy"] = time.monotonic() - t0
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already current" in done.stdout and "token (kept)" in done.stdout
    assert "replacing pid" in done.stdout and "pinned to cpu1" in done.stdout
    assert not first & set(native_pids(board, b"device_server")), "the old daemon must be gone"
    with DeviceClient(address, token=token, timeout_s=120) as client:
        assert client.device_info().pinned_cpus == (1,)
    assert bench(address, token_file, "linear", "--in", "64", "--out", "32")["timing"]

    common = ["--device", board.device, "--ssh-config", str(board.ssh_config)]
    code, out, err = run_cli("status", *common)
    assert code == 0 and f"{address}: SERVING" in out, out + err
    t0 = time.monotonic()
    code, out, err = run_cli("stop", *common)
    timings["stop"] = time.monotonic() - t0
    assert code == 0 and "stopped the daemon" in out, err
    assert not native_pids(board, b"device_server")
    with pytest.raises(DeviceError), DeviceClient(address, timeout_s=3, retries=0) as gone:
        gone.wait_ready(timeout_s=3)
    code, out, _ = run_cli("status", *common)
    assert code == 3 and "stopped" in out
