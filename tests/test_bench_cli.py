"""`netadapt-bench` end to end: subcommands against the real daemon on loopback (in-process via
`main(argv)`), the embedded local daemon and error exits (as a console command in a
subprocess)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from device_server.server import RunningServer, ServerConfig, running_server
from device_server.spec import LayerSpec
from host.cli.netadapt_bench import load_specs, main
from tests.test_client import gemm_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--repeat", "3", "--warmup", "2", "--min-warmup-ms", "1", "--min-repeat-ms", "1"]

SPECS = [
    LayerSpec.create("conv2d", (1, 16, 28, 28), out_channels=32, kernel=3, padding=1),
    LayerSpec.create("linear", (1, 128), out_channels=10),
    LayerSpec.create("conv2d", (1, 32, 14, 14), out_channels=32, kernel=3, padding=1, groups=32),
]
HUGE = LayerSpec.create("conv2d", (1, 512, 224, 224), out_channels=512, kernel=7, padding=3)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str) -> None:
    assert err.startswith("netadapt-bench"), err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err


@pytest.fixture()
def device(daemon: RunningServer) -> list[str]:
    return ["--device", daemon.address, *FAST]


# -- subcommands --------------------------------------------------------------------------------
def test_conv2d_table(capsys: pytest.CaptureFixture[str], device: list[str]) -> None:
    code, out, err = run(capsys, *device, "conv2d", "--cin", "32", "--cout", "64", "-k", "3",
                         "-s", "1", "--hw", "28", "--bn", "--act", "relu6")
    assert code == 0, err
    header, rule, row = out.strip().splitlines()
    for column in ("config", "median ms", "p90 ms", "std ms", "n", "number", "provider",
                   "threads"):
        assert column in header
    assert set(rule.replace(" ", "")) == {"-"}
    assert row.startswith("conv3x3/s1 32->64 @28x28+bn+relu6")
    cells = row.split()
    assert (cells[-4], cells[-2], cells[-1]) == ("3", "CPU", "1")  # n, provider, threads
    assert float(cells[-7]) > 0  # median ms


def test_json_after_the_subcommand_parses(
    capsys: pytest.CaptureFixture[str], device: list[str]
) -> None:
    code, out, err = run(capsys, *device, "dwconv", "--channels", "32", "-k", "3", "-s", "2",
                         "--hw", "28", "--json", "--threads", "1")
    assert code == 0, err
    record = json.loads(out)
    assert record["config"]["groups"] == 32 and record["config"]["stride"] == [2, 2]
    assert record["config"]["padding"] == [1, 1]  # "same" for a 3x3 kernel
    assert record["timing"]["samples_count"] == 3
    assert record["conditions"]["intra_op_threads"] == 1
    assert record["label"].startswith("dwconv3x3/s2")


def test_linear_info_and_overhead(capsys: pytest.CaptureFixture[str], device: list[str]) -> None:
    code, out, err = run(capsys, *device, "--json", "linear", "--in", "1024", "--out", "1000")
    assert code == 0, err
    assert json.loads(out)["config"]["out_channels"] == 1000

    code, out, err = run(capsys, *device, "info")
    assert code == 0, err
    assert "fingerprint" in out and "CPUExecutionProvider" in out
    code, out, err = run(capsys, *device, "info", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["fingerprint"] and "CPUExecutionProvider" in info["providers"]

    code, out, err = run(capsys, *device, "overhead")
    assert code == 0, err
    assert "session overhead" in out
    code, out, err = run(capsys, *device, "overhead", "--json")
    assert code == 0, err
    assert json.loads(out)["timing"]["samples_count"] == 3


def test_batch_jsonl_and_json_list(
    capsys: pytest.CaptureFixture[str], device: list[str], tmp_path: Path
) -> None:
    jsonl = tmp_path / "configs.jsonl"
    jsonl.write_text("# layers\n" + "\n".join(json.dumps(s.to_dict()) for s in SPECS) + "\n\n")
    code, out, err = run(capsys, *device, "batch", str(jsonl))
    assert code == 0, err
    rows = out.strip().splitlines()[2:]
    assert [r.split("  ")[0].strip() for r in rows] == [s.describe() for s in SPECS]

    as_list = tmp_path / "configs.json"
    as_list.write_text(json.dumps([s.to_dict() for s in SPECS], indent=1))
    assert load_specs(str(as_list)) == SPECS
    code, out, err = run(capsys, *device, "--json", "batch", str(as_list))
    assert code == 0, err
    records = json.loads(out)
    assert [LayerSpec.from_dict(r["config"]) for r in records] == SPECS  # in file order


def test_batch_item_refused_by_the_daemon_does_not_stop_it(
    capsys: pytest.CaptureFixture[str], device: list[str], tmp_path: Path
) -> None:
    path = tmp_path / "configs.jsonl"
    specs = [SPECS[0], HUGE, SPECS[1]]
    path.write_text("\n".join(json.dumps(s.to_dict()) for s in specs))
    code, out, err = run(capsys, *device, "batch", str(path))
    assert code == 1
    rows = out.strip().splitlines()[2:]
    assert len(rows) == 3 and "FAILED" in rows[1] and "FAILED" not in rows[0] + rows[2]
    assert "RESOURCE_EXHAUSTED" in err and "1 of 3 layers failed" in err
    assert "Traceback" not in err


def test_model(capsys: pytest.CaptureFixture[str], device: list[str], tmp_path: Path) -> None:
    path = tmp_path / "gemm.onnx"
    path.write_bytes(gemm_model(64, 32))
    code, out, err = run(capsys, *device, "--json", "model", str(path),
                         "--input-shape", "x=4,64")
    assert code == 0, err
    record = json.loads(out)
    assert record["config"] is None and len(record["model_sha256"]) == 64
    assert record["timing"]["samples_count"] == 3
    code, out, err = run(capsys, *device, "model", str(path))
    assert code == 0, err
    assert out.strip().splitlines()[2].startswith("gemm.onnx (")


def test_token_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with running_server(ServerConfig(token="s3cret", grace_s=0.5)) as server:
        code, out, err = run(capsys, "--device", server.address, "--token-file", str(token),
                             "info")
        assert code == 0, err
        code, out, err = run(capsys, "--device", server.address, "info")
        assert code == 1
        assert_one_line_error(err)
        assert "UNAUTHENTICATED" in err


# -- errors: one line, non-zero, no traceback ---------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "exit_code", "needle"),
    [
        (["conv2d", "--cin", "3"], 2, "required"),
        (["conv2d", "--cin", "3", "--cout", "5", "--groups", "2", "--hw", "9"], 2, "divisible"),
        (["conv2d", "--cin", "3", "--cout", "8", "-k", "4", "--hw", "9"], 2, "odd kernel"),
        (["conv2d", "--cin", "3", "--cout", "8", "--hw", "0"], 2, "HxW"),
        (["--repeat", "0", "info"], 2, "positive integer"),
        (["model", "/no/such/model.onnx"], 2, "cannot read /no/such/model.onnx"),
        (["batch", "/no/such/configs.jsonl"], 2, "cannot read"),
        (["--token-file", "/no/such/token", "info"], 2, "token file"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_usage_errors_exit_2_before_connecting(
    capsys: pytest.CaptureFixture[str], argv: list[str], exit_code: int, needle: str
) -> None:
    # An unreachable --device proves nothing was attempted: the input is checked first.
    code, out, err = run(capsys, "--device", "127.0.0.1:1", *argv)
    assert code == exit_code
    assert out == ""
    assert_one_line_error(err)
    assert needle in err


def test_bad_batch_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = {
        "broken.jsonl": (json.dumps(SPECS[0].to_dict()) + "\n{not json\n", "broken.jsonl:2"),
        "invalid.jsonl": ('{"op": "conv2d", "input_shape": [1, 3, 8, 8]}\n', "out_channels"),
        "unknown.jsonl": ('{"op": "linear", "input_shape": [1, 3], "colour": 1}\n', "LayerSpec"),
        "empty.jsonl": ("\n# nothing\n", "no layer configs"),
    }
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, out, err = run(capsys, "--device", "127.0.0.1:1", "batch", str(path))
        assert code == 2, (name, err)
        assert_one_line_error(err)
        assert needle in err, (name, err)


def test_device_errors_exit_1(
    capsys: pytest.CaptureFixture[str], device: list[str], tmp_path: Path
) -> None:
    cases = [
        (["--provider", "NoSuch", "linear", "--in", "8", "--out", "8"], "FAILED_PRECONDITION"),
        (["conv2d", "--cin", "512", "--cout", "512", "-k", "7", "--hw", "224"],
         "RESOURCE_EXHAUSTED"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *device, *argv)
        assert code == 1, (argv, err)
        assert_one_line_error(err)
        assert needle in err


def test_a_model_the_daemon_refuses_exits_2(
    capsys: pytest.CaptureFixture[str], device: list[str], tmp_path: Path
) -> None:
    """INVALID_ARGUMENT for a model (not ONNX, or inputs it cannot take) is the user's input."""
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("these are not the weights you are looking for\n" * 10)
    code, out, err = run(capsys, *device, "model", str(not_onnx))
    assert code == 2, err
    assert_one_line_error(err)
    assert "not a valid ONNX model" in err


def _console_command() -> list[str]:
    script = Path(sys.executable).parent / "netadapt-bench"
    if script.exists():
        return [str(script)]
    found = shutil.which("netadapt-bench")
    return [found] if found else [sys.executable, "-m", "host.cli.netadapt_bench"]


def test_console_command_unreachable_device_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    proc = subprocess.run(
        [*_console_command(), "--device", address, "info"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr)
    assert address in proc.stderr and "daemon is running" in proc.stderr


def test_console_command_without_device_starts_a_local_daemon() -> None:
    proc = subprocess.run(
        [*_console_command(), *FAST, "--json", "linear", "--in", "64", "--out", "32"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["config"]["op"] == "linear"
    assert record["conditions"]["intra_op_threads"] == 1
