"""`netadapt-bench`: time single layers, batches of layers or whole ONNX models on a device.

    netadapt-bench [--device HOST:PORT] [--token-file F] [--tls-root-cert PEM] [--threads N]
                   [--provider P] [--repeat R] [--warmup W] [--json] SUBCOMMAND ...

The device options are netadapt-host's (host/cli/common.py: the same names, defaults and help);
bench measures on one device.

Subcommands: `conv2d`, `dwconv`, `linear` (one layer), `model FILE.onnx`, `batch FILE`
(LayerSpec dicts, one JSON object a line or one JSON list), `info`, `overhead`.

Without `--device` a daemon is started on loopback for the run (the embedded default), so the
numbers are this machine's. Every number comes from the daemon; nothing is timed here.

Output is a readable table on stdout, or JSON with `--json`. Errors are one line on stderr:
exit code 2 when the command line or an input file is wrong (nothing was measured), 1 when the
device could not be reached or refused or failed a measurement.

Imports neither torch nor onnx.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from device_server.device_state import DeviceState
from device_server.errors import InvalidConfigError
from device_server.inputs import InputFeed
from device_server.spec import Activation, LayerSpec, MeasurePolicy, SessionSpec
from host.cli.common import (
    EXIT_DEVICE,
    CliParser,
    CommandError,
    add_device_options,
    parse_command_line,
    positive_int,
    run_command,
    session_from_args,
    tls_root_cert_from_args,
    token_from_args,
)
from host.cli.table import format_ms, format_table
from host.device.client import DeviceClient, DeviceError, DeviceInfo, MeasureFailure, Measurement
from host.device.local_daemon import start_local_daemon
from host.device.summary import clusters_line, pinning_line

__all__ = ["main", "InputError"]

logger = logging.getLogger(__name__)

PROG = "netadapt-bench"
_DEFAULT_POLICY = MeasurePolicy()
_TABLE_HEADERS = ("config", "median ms", "p90 ms", "std ms", "n", "number", "provider", "threads")
_TABLE_RIGHT = (False, True, True, True, True, True, False, True)


class InputError(CommandError):
    """The command line or an input file is wrong; the message says what to fix."""


_Parser = CliParser


# -- argument types --------------------------------------------------------------------------
_positive_int = positive_int


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _hw(text: str) -> tuple[int, int]:
    """`56` or `56x28` (height x width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive sizes, got {text!r}")
    return (values[0], values[-1])


def _padding(text: str) -> str | int:
    if text == "same":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'same' or an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"padding must be >= 0, got {value}")
    return value


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`NAME=1,3,224,224`."""
    name, sep, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... (positive dims), got {text!r}")
    return name, shape


def _input_range(text: str) -> tuple[str, InputFeed]:
    """`NAME=int:0..1` or `NAME=float:-1.5..2`."""
    name, sep, rest = text.partition("=")
    kind, colon, bounds = rest.partition(":")
    low_text, dots, high_text = bounds.partition("..")
    usage = f"expected NAME=int:LOW..HIGH or NAME=float:LOW..HIGH, got {text!r}"
    if not sep or not name or not colon or not dots or kind not in ("int", "float"):
        raise argparse.ArgumentTypeError(usage)
    try:
        cast = int if kind == "int" else float
        low, high = cast(low_text), cast(high_text)
    except ValueError:
        raise argparse.ArgumentTypeError(usage) from None
    if high < low:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW must not exceed HIGH")
    return name, InputFeed.range(low, high, integer=kind == "int")


def _read_npz(path: str) -> dict[str, InputFeed]:
    """Exact input values from a numpy .npz (one array per input name)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read input values from {path}: {exc}") from None
    if not arrays:
        raise InputError(f"{path} holds no arrays; save one per input name with numpy.savez")
    return {name: InputFeed(values=a) for name, a in arrays.items()}


# -- the parser ------------------------------------------------------------------------------
def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options accepted before or after the subcommand (after it, they default to SUPPRESS so
    they do not overwrite what was given before it)."""

    def d(value: object) -> Any:
        return argparse.SUPPRESS if suppress else value

    add_device_options(parser, suppress=suppress, tls=True)
    g = parser.add_argument_group("measurement options")
    g.add_argument("--repeat", type=_positive_int, metavar="R", default=d(_DEFAULT_POLICY.repeat),
                   help=f"timed samples (default {_DEFAULT_POLICY.repeat})")
    g.add_argument("--warmup", type=_positive_int, metavar="W",
                   default=d(_DEFAULT_POLICY.warmup_runs),
                   help=f"warm-up calls, at least (default {_DEFAULT_POLICY.warmup_runs})")
    g.add_argument("--number", type=_positive_int, metavar="K", default=d(None),
                   help="calls per sample (default: auto, so a sample lasts >= --min-repeat-ms)")
    g.add_argument("--min-repeat-ms", type=_non_negative_float, metavar="MS",
                   default=d(_DEFAULT_POLICY.min_repeat_ms),
                   help=f"shortest sample (default {_DEFAULT_POLICY.min_repeat_ms:g})")
    g.add_argument("--min-warmup-ms", type=_non_negative_float, metavar="MS",
                   default=d(_DEFAULT_POLICY.min_warmup_ms),
                   help=f"shortest warm-up (default {_DEFAULT_POLICY.min_warmup_ms:g})")
    g.add_argument("--timeout", type=_non_negative_float, metavar="S", default=d(120.0),
                   help="deadline of one measurement in seconds (default 120)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="print JSON instead of a table")
    g.add_argument("-v", "--verbose", action="store_true", default=d(False),
                   help="log what happens (to stderr)")


def _add_conv_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--kernel", type=_positive_int, default=3, help="kernel size (default 3)")
    p.add_argument("-s", "--stride", type=_positive_int, default=1, help="stride (default 1)")
    p.add_argument("--hw", type=_hw, required=True, metavar="H[xW]", help="input height x width")
    p.add_argument("--padding", type=_padding, default="same", metavar="same|N",
                   help="'same' (dilation*(k-1)/2, odd kernels) or pixels (default same)")
    p.add_argument("--dilation", type=_positive_int, default=1, help="kernel dilation")
    p.add_argument("--bn", action="store_true", help="followed by BatchNorm")
    p.add_argument("--bias", action="store_true", help="the layer has a bias")
    p.add_argument("--act", choices=[a.value for a in Activation], default="none",
                   help="activation after the conv")
    p.add_argument("--residual", action="store_true", help="add the input before the activation")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Time layers or ONNX models on a netadapt device daemon.",
        epilog="Without --device a daemon is started on loopback for the run. Exit codes: 0 ok, "
        "1 device error, 2 bad command line or input file.",
    )
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        _add_common(p, suppress=True)
        return p

    p = add("conv2d", "time one convolution (+BatchNorm, activation, residual)")
    p.add_argument("--cin", type=_positive_int, required=True, help="input channels")
    p.add_argument("--cout", type=_positive_int, required=True, help="output channels")
    p.add_argument("--groups", type=_positive_int, default=1,
                   help="convolution groups (in and out channels divisible by it)")
    _add_conv_options(p)

    p = add("dwconv", "time one depthwise convolution")
    p.add_argument("--channels", type=_positive_int, required=True,
                   help="channels in and out (one filter per channel)")
    _add_conv_options(p)

    p = add("linear", "time one fully-connected layer")
    p.add_argument("--in", dest="in_features", type=_positive_int, required=True,
                   help="input features")
    p.add_argument("--out", dest="out_features", type=_positive_int, required=True,
                   help="output features")
    p.add_argument("--bias", action="store_true", help="the layer has a bias")
    p.add_argument("--act", choices=[a.value for a in Activation], default="none",
                   help="activation after the layer")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size")

    p = add("model", "time a whole ONNX model (uploaded once, then measured by reference)")
    p.add_argument("path", help="an .onnx file")
    p.add_argument("--input-shape", type=_input_shape, action="append", default=[],
                   metavar="NAME=D1,D2,..", help="shape of an input with symbolic dims")
    p.add_argument("--input", type=_input_range, action="append", default=[],
                   metavar="NAME=int:LOW..HIGH",
                   help="draw an input's values in a range (int: both ends included; or "
                        "float:LOW..HIGH); default: random, within what the graph takes where "
                        "it tells (a Gather's indices inside its table)")
    p.add_argument("--inputs", metavar="FILE.npz",
                   help="exact input values, one array per input name (numpy.savez)")

    p = add("batch", "time many layers: LayerSpec dicts, one JSON a line (or one JSON list)")
    p.add_argument("path", help="a .jsonl or .json file ('-' for stdin)")

    add("info", "show the device: fingerprint, CPU, runtime, providers, queue")
    add("overhead", "time an empty session run (the per-call cost to subtract from sums)")
    return parser


# -- building requests from arguments --------------------------------------------------------
def _conv_padding(args: argparse.Namespace) -> int:
    if args.padding != "same":
        return int(args.padding)
    if args.kernel % 2 == 0:
        raise InputError(f"--padding same needs an odd kernel, got -k {args.kernel}; give pixels")
    return args.dilation * (args.kernel - 1) // 2


def _layer_from_args(args: argparse.Namespace) -> LayerSpec:
    """Raises InvalidConfigError (as the daemon would) for a layer that cannot be built."""
    if args.command == "linear":
        return LayerSpec.create(
            "linear",
            (args.batch, args.in_features),
            out_channels=args.out_features,
            bias=args.bias,
            activation=args.act,
        )
    if args.command == "dwconv":
        cin = cout = groups = args.channels
    else:
        cin, cout, groups = args.cin, args.cout, args.groups
    h, w = args.hw
    return LayerSpec.create(
        "conv2d",
        (args.batch, cin, h, w),
        out_channels=cout,
        kernel=args.kernel,
        stride=args.stride,
        padding=_conv_padding(args),
        dilation=args.dilation,
        groups=groups,
        bias=args.bias,
        batch_norm=args.bn,
        activation=args.act,
        residual=args.residual,
    )


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a text file (expected JSON lines)") from None


def load_specs(path: str) -> list[LayerSpec]:
    """LayerSpec dicts from a JSON-lines file (blank and '#' lines skipped) or a JSON list.

    Raises:
        InputError: unreadable file, bad JSON, or a config that cannot be built (with its line).
    """
    text = _read_text(path)
    stripped = text.lstrip()
    entries: list[tuple[str, object]] = []
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        entries = [(f"{path}: item {i}", item) for i, item in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                entries.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
    if not entries:
        raise InputError(f"{path} holds no layer configs")
    specs = []
    for where, item in entries:
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a JSON object (LayerSpec.to_dict()), got {item!r}")
        try:
            specs.append(LayerSpec.from_dict(item))
        except InvalidConfigError as exc:
            raise InputError(f"{where}: {exc}") from None
        except TypeError as exc:  # unknown or missing keys
            raise InputError(f"{where}: not a LayerSpec dict ({exc})") from None
    return specs


def _read_model(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise InputError(f"{path} is empty; expected an ONNX model")
    _check_self_contained(path, data)
    return data


def _check_self_contained(path: str, data: bytes) -> None:
    """Refuses, before connecting, a model the daemon would refuse for naming files (external
    weights): the same check the daemon runs, so the message is the daemon's."""
    import onnx

    from device_server.model_check import check_self_contained

    try:
        model = onnx.load_from_string(data)
    except Exception:  # not ONNX at all: the daemon says so (and how)
        return
    try:
        check_self_contained(model)
    except InvalidConfigError as exc:
        raise InputError(f"{path}: {exc}") from None


def _policy(args: argparse.Namespace) -> MeasurePolicy:
    policy = MeasurePolicy(
        warmup_runs=args.warmup,
        min_warmup_ms=args.min_warmup_ms,
        repeat=args.repeat,
        number=args.number or 0,
        min_repeat_ms=args.min_repeat_ms,
    )
    policy.validate()
    return policy


# -- output ----------------------------------------------------------------------------------
def _short_provider(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider") or provider


def _row(label: str, m: Measurement) -> list[object]:
    t, c = m.timing, m.conditions
    return [
        label,
        format_ms(t.median_ms),
        format_ms(t.p90_ms),
        format_ms(t.std_ms),
        t.samples_count,
        t.number,
        _short_provider(c.provider),
        c.intra_op_threads,
    ]


def _failure_row(label: str) -> list[object]:
    return [label, "FAILED", "", "", "", "", "", ""]


def _print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2) + "\n")


def _records(rows: Sequence[tuple[str, Measurement | MeasureFailure]]) -> list[dict[str, object]]:
    return [{"label": label, **r.to_dict()} for label, r in rows]


def _print_measurements(
    rows: Sequence[tuple[str, Measurement | MeasureFailure]], as_json: bool, out: TextIO
) -> None:
    """A table, or JSON: a list of records (`label`, `config`, `timing`, `conditions`, ... or
    `error`)."""
    if as_json:
        _print_json(_records(rows), out)
        return
    table = [
        _row(label, r) if isinstance(r, Measurement) else _failure_row(label) for label, r in rows
    ]
    out.write(format_table(_TABLE_HEADERS, table, right_align=_TABLE_RIGHT) + "\n")


def _print_single(label: str, m: Measurement, as_json: bool, out: TextIO) -> None:
    """A one-row table, or one JSON record (an object, not a list)."""
    if as_json:
        _print_json(_records([(label, m)])[0], out)
    else:
        _print_measurements([(label, m)], False, out)


def _print_info(info: DeviceInfo, address: str, as_json: bool, out: TextIO) -> None:
    if as_json:
        _print_json({"address": address, **info.to_dict()}, out)
        return
    rows: list[tuple[str, object]] = [
        ("address", address),
        ("fingerprint", info.fingerprint),
        ("cpu", f"{info.cpu_model} ({info.cpu_count} cores, {info.machine})"),
    ]
    if info.clusters:
        rows += [("clusters", clusters_line(info)), ("pinned", pinning_line(info))]
    rows += [(name, value) for name, value in (("product", info.product_model),
                                               ("board", info.board_model), ("soc", info.soc))
             if value]
    rows.append(("os", f"{info.os} {info.os_release}"))
    if info.android_version:
        rows.append(("android", info.android_version))
    if info.build_fingerprint:
        rows.append(("build", info.build_fingerprint))
    rows += [
        ("onnxruntime", info.ort_version),
        ("providers", ", ".join(info.providers)),
        ("daemon", f"{info.daemon_version} (Python {info.python_version})"),
        ("default threads", info.default_threads),
        ("queue", f"{info.queue_depth} of {info.max_queue_depth}"),
    ]
    rows += _state_rows(info.state)
    out.write(format_table(("field", "value"), rows, right_align=(False, False)) + "\n")


def _state_rows(state: DeviceState) -> list[tuple[str, object]]:
    """The device's state as read, one row per reading."""
    rows: list[tuple[str, object]] = []
    if state.load is not None:
        rows.append(("load (1, 5, 15 min)", f"{state.load.one_min:.2f} {state.load.five_min:.2f} "
                                            f"{state.load.fifteen_min:.2f}"))
    rows += [(f"cpu{c.cpu} MHz", c.mhz) for c in state.clocks]
    rows += [(f"{z.type} °C", f"{z.temp_c:.1f}") for z in state.thermal_zones]
    for b in state.batteries:
        parts = [f"{b.percent}%" if b.percent is not None else "", b.status,
                 f"{b.temp_c:.1f} °C" if b.temp_c is not None else ""]
        rows.append((f"battery {b.name}", ", ".join(p for p in parts if p)))
    return rows


# -- subcommands -----------------------------------------------------------------------------
# What a subcommand does once connected: (client, address) -> exit code.
_Job = Callable[[DeviceClient, str], int]


def _prepare(args: argparse.Namespace, out: TextIO, err: TextIO) -> _Job:
    """Reads files and validates configs first, so bad input fails before a daemon starts."""
    session = session_from_args(args)
    policy = _policy(args)
    timeout_s = args.timeout or None

    if args.command in ("conv2d", "dwconv", "linear"):
        try:
            spec = _layer_from_args(args)
        except InvalidConfigError as exc:
            raise InputError(f"invalid {args.command}: {exc}") from None

        def run_layer(client: DeviceClient, address: str) -> int:
            m = client.measure(spec, session, policy, timeout_s=timeout_s)
            _print_single(spec.describe(), m, args.json, out)
            return 0

        return run_layer

    if args.command == "model":
        data = _read_model(args.path)
        shapes = dict(args.input_shape)
        feeds = {**(_read_npz(args.inputs) if args.inputs else {}), **dict(args.input)}

        def run_model(client: DeviceClient, address: str) -> int:
            try:
                m = client.measure_model(data, session, policy, shapes or None,
                                         timeout_s=timeout_s, input_feeds=feeds)
            except DeviceError as exc:
                if exc.code == "INVALID_ARGUMENT":  # the model or its inputs: the user's input
                    raise InputError(str(exc)) from None
                raise
            label = f"{os.path.basename(args.path)} ({(m.model_sha256 or '')[:12]})"
            _print_single(label, m, args.json, out)
            return 0

        return run_model

    if args.command == "batch":
        specs = load_specs(args.path)

        def run_batch(client: DeviceClient, address: str) -> int:
            return _run_batch(client, specs, session, policy, args, out, err, timeout_s)

        return run_batch

    if args.command == "info":

        def run_info(client: DeviceClient, address: str) -> int:
            _print_info(client.device_info(timeout_s=timeout_s), address, args.json, out)
            return 0

        return run_info

    assert args.command == "overhead", f"unhandled subcommand {args.command}"

    def run_overhead(client: DeviceClient, address: str) -> int:
        # overhead() returns the timing alone: show the session as asked for.
        t = client.overhead(session, policy, timeout_s=timeout_s)
        if args.json:
            timing = {**dataclasses.asdict(t), "samples_ms": list(t.samples_ms)}
            record = {"label": "session overhead", "provider": session.provider,
                      "intra_op_threads": session.intra_op_threads, "timing": timing}
            _print_json(record, out)
        else:
            threads = session.intra_op_threads or "default"
            row = ["session overhead", format_ms(t.median_ms), format_ms(t.p90_ms),
                   format_ms(t.std_ms), t.samples_count, t.number,
                   _short_provider(session.provider), threads]
            out.write(format_table(_TABLE_HEADERS, [row], right_align=_TABLE_RIGHT) + "\n")
        return 0

    return run_overhead


def _run_batch(
    client: DeviceClient,
    specs: list[LayerSpec],
    session: SessionSpec,
    policy: MeasurePolicy,
    args: argparse.Namespace,
    out: TextIO,
    err: TextIO,
    timeout_s: float | None,
) -> int:
    stream_timeout = timeout_s * len(specs) if timeout_s else None
    results: list[Measurement | MeasureFailure] = []
    with _progress(len(specs), err) as advance:
        for r in client.measure_many(specs, session, policy, timeout_s=stream_timeout):
            results.append(r)
            advance()
    # Answers come in the order measured: print in the order of the file.
    rows = [(_label(r), r) for r in sorted(results, key=lambda r: r.index)]
    _print_measurements(rows, args.json, out)
    failures = [r for _, r in rows if isinstance(r, MeasureFailure)]
    for f in failures:
        err.write(f"{PROG}: {f.spec.describe()}: {f.code}: {f.message}\n")
    if failures:
        err.write(f"{PROG}: {len(failures)} of {len(specs)} layers failed\n")
        return EXIT_DEVICE
    return 0


@contextlib.contextmanager
def _progress(total: int, err: TextIO) -> Iterator[Callable[[], None]]:
    """A tqdm bar on `err` when it is a terminal (and tqdm is installed: a host extra)."""
    try:
        from tqdm import tqdm
    except ImportError:  # a device-only install: no bar
        yield lambda: None
        return
    with tqdm(total=total, unit="layer", file=err, disable=None, leave=False) as bar:
        yield lambda: bar.update(1)


def _label(r: Measurement | MeasureFailure) -> str:
    return r.spec.describe() if r.spec is not None else r.request_id


@contextlib.contextmanager
def _connect(args: argparse.Namespace, token: str | None) -> Iterator[tuple[DeviceClient, str]]:
    timeout_s = args.timeout or 120.0
    if args.device:
        (address,) = args.device  # one: checked before anything was read
        with DeviceClient(address, token=token, tls_root_cert=tls_root_cert_from_args(args),
                          timeout_s=timeout_s) as client:
            yield client, address
        return
    logger.info("no --device: starting a daemon on loopback for this run")
    with start_local_daemon(threads=args.threads, token=token) as daemon:
        with daemon.client(timeout_s=timeout_s) as client:
            yield client, f"{daemon.address} (local daemon)"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Runs the command line; returns the exit code (never raises for bad input)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = parse_command_line(build_parser(), argv, err)
    if isinstance(args, int):
        return args

    def run() -> int:
        if len(args.device) > 1:
            raise InputError(f"netadapt-bench measures on one device; --device was given "
                             f"{len(args.device)} times")
        token = token_from_args(args)
        tls_root_cert_from_args(args)
        job = _prepare(args, out, err)
        with _connect(args, token) as (client, address):
            return job(client, address)

    return run_command(PROG, run, err, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
