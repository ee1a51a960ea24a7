"""Options and error handling shared by the command lines: the one set of device options
(`netadapt-host`'s commands and `netadapt-bench`; `netadapt-deploy` shares `--threads`), which
model, and the one place exceptions become a one-line message and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from device_server.errors import InvalidConfigError
from device_server.spec import DEFAULT_PROVIDER, SessionSpec
from host.device.client import DeviceError
from host.device.connect import TokenFileError, open_pool, read_token
from host.device.local_daemon import DaemonStartError
from host.device.pool import DevicePool, FingerprintMismatch

__all__ = ["CliParser", "CommandError", "DefaultsHelpFormatter", "EXIT_DEVICE", "EXIT_USAGE",
           "EXIT_NOT_SERVING",
           "add_device_options", "add_threads_option", "positive_int", "pool_from_args",
           "tls_root_cert_from_args",
           "DEFAULT_THREADS",
           "add_protocol_options", "protocol_from_args",
           "add_model_options", "load_network_from_args", "session_from_args",
           "token_from_args", "run_command", "parse_shape", "parse_command_line"]

log = logging.getLogger(__name__)

EXIT_DEVICE = 1       # a device, table or run failed
EXIT_USAGE = 2        # the command line or an input is wrong; nothing was measured
EXIT_NOT_SERVING = 3  # netadapt-deploy status: the daemon is not running or not serving


class CliParser(argparse.ArgumentParser):
    """The one parser base of every command line: errors on one line (no usage dump) with
    exit code EXIT_USAGE, and every option's default in its help (`DefaultsHelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       err: TextIO) -> argparse.Namespace | int:
    """The parsed arguments, with logging to `err` at INFO under `-v`/`--verbose` (else
    WARNING); or argparse's exit code for --help (0) or a usage error (2), already printed."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=err)
    return args


class CommandError(Exception):
    """A user error with a message that says what to change (exit code 2)."""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        message = f"expected N,C,H,W (e.g. 1,1,28,28), got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive sizes N,C,H,W, got {text!r}")
    return dims


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mobilenet_v1",
                   help="built-in name (mobilenet_v1, mobilenet_v2, efficientnet_lite0, "
                        "tiny_cnn) or package.module:factory")
    p.add_argument("--input-shape", type=parse_shape, default=(1, 1, 28, 28),
                   help="N,C,H,W (default 1,1,28,28: the built-in MNIST task)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="size of the model's classifier output")


DEFAULT_THREADS = 1  # what netadapt-device serve measures with unless a request says otherwise


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_threads_option(group: Any, default: object = DEFAULT_THREADS) -> None:
    """`--threads`, the same in every command line (a table is valid only for its count)."""
    group.add_argument("--threads", type=positive_int, metavar="N", default=default,
                       help=f"ONNX Runtime intra-op threads per measurement (default "
                            f"{DEFAULT_THREADS}: measure with the count you will deploy with)")


def add_device_options(p: argparse.ArgumentParser, *, suppress: bool = False,
                       tls: bool = False) -> None:
    """The one set of device options: which daemons, how to reach them, which session.

    Args:
        suppress: give every option the default SUPPRESS (for a sub-command's copy of options
            also accepted before it: what was given before is then kept).
        tls: add `--tls-root-cert` (for commands that connect with `pool_from_args` or honour
            it themselves).
    """

    def d(value: object) -> Any:
        return argparse.SUPPRESS if suppress else value

    g = p.add_argument_group("device and session")
    g.add_argument("--device", action="append", default=d([]), metavar="HOST:PORT",
                   help="a measurement daemon; repeat for a pool of alike devices where the "
                        "command measures on several (default: start one on loopback for the "
                        "run)")
    g.add_argument("--token-file", metavar="FILE", default=d(None),
                   help="file holding the daemons' bearer token")
    if tls:
        g.add_argument("--tls-root-cert", metavar="PEM", default=d(None),
                       help="root certificate to verify TLS daemons")
    add_threads_option(g, default=d(DEFAULT_THREADS))
    g.add_argument("--provider", metavar="P", default=d(DEFAULT_PROVIDER),
                   help="ONNX Runtime execution provider, e.g. CPU or XnnpackExecutionProvider")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help unless the help already names its default or
    the default says nothing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default == [] or (
            default is argparse.SUPPRESS)
        if "default" in text or silent or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_protocol_options(p: argparse.ArgumentParser) -> None:
    """How whole networks are measured (host/device/whole_model.py): rounds and interval target."""
    from host.device.whole_model import WholeModelProtocol

    d = WholeModelProtocol()
    g = p.add_argument_group("whole-network measurement (rounds of the robust protocol)")
    g.add_argument("--min-rounds", type=int, default=d.min_rounds,
                   help=f"fewest interleaved rounds per network (default {d.min_rounds}: the "
                        f"fewest whose figure can be tight: its upper bound is then the 3rd "
                        f"fastest round)")
    g.add_argument("--max-rounds", type=int, default=d.max_rounds,
                   help=f"most rounds before a figure is reported not tight (default "
                        f"{d.max_rounds})")
    g.add_argument("--decision-rounds", type=int, default=d.decision_rounds,
                   help=f"most rounds a budget decision takes while its interval straddles the "
                        f"budget, before it is decided on the interval as it stands (default "
                        f"{d.decision_rounds})")
    g.add_argument("--target-halfwidth", type=float, default=d.target_halfwidth,
                   help=f"stop when every interval is within this fraction of its figure "
                        f"(default {d.target_halfwidth}, i.e. +-{100 * d.target_halfwidth:.1f}%%)")


def protocol_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The WholeModelProtocol the options above ask for."""
    from host.device.whole_model import WholeModelProtocol

    try:
        return WholeModelProtocol(min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                                  decision_rounds=args.decision_rounds,
                                  target_halfwidth=args.target_halfwidth)
    except ValueError as exc:
        raise CommandError(f"{exc} (--min-rounds, --max-rounds, --decision-rounds, "
                           f"--target-halfwidth)") from None


def token_from_args(args: argparse.Namespace) -> str | None:
    return read_token(args.token_file) if args.token_file else None


def tls_root_cert_from_args(args: argparse.Namespace) -> str | None:
    """`--tls-root-cert`, checked to be a file (CommandError otherwise)."""
    path: str | None = getattr(args, "tls_root_cert", None)
    if path and not os.path.isfile(path):
        raise CommandError(f"cannot read --tls-root-cert {path}: no such file")
    return path


def session_from_args(args: argparse.Namespace) -> SessionSpec:
    if args.threads < 1:
        raise CommandError("--threads must be >= 1")
    provider = args.provider
    if not provider.endswith("ExecutionProvider"):
        provider = f"{provider}ExecutionProvider"  # "CPU" -> "CPUExecutionProvider"
    return SessionSpec(provider=provider, intra_op_threads=args.threads)


@contextlib.contextmanager
def pool_from_args(args: argparse.Namespace, timeout_s: float = 120.0) -> Iterator[DevicePool]:
    """The devices the options name (`--device`, `--token-file`, `--tls-root-cert`), or a
    daemon started on loopback with `--threads` when none is named."""
    with open_pool(args.device, token_from_args(args), args.threads, timeout_s=timeout_s,
                   tls_root_cert=tls_root_cert_from_args(args)) as pool:
        yield pool


def load_network_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from host.network import load_network  # torch: imported only by commands that need it

    return load_network(args.model, args.input_shape, args.num_classes)


def run_command(prog: str, run: Callable[[], int], err: TextIO | None = None,
                verbose: bool = False) -> int:
    """Runs a command, turning every failure into one line on stderr and an exit code."""
    err = err or sys.stderr

    def fail(code: int, message: str) -> int:
        err.write(f"{prog}: error: {message}\n")
        return code

    from host.engine.failures import RunFailure
    from lut.errors import LutError

    try:
        return run()
    except (CommandError, TokenFileError, InvalidConfigError) as exc:
        return fail(EXIT_USAGE, str(exc))
    except (DeviceError, FingerprintMismatch, LutError, RunFailure) as exc:
        return fail(EXIT_DEVICE, str(exc))
    except DaemonStartError as exc:
        first, _, rest = str(exc).partition("\n")
        log.info("local daemon log:\n%s", rest)
        hint = "" if verbose else " (run with -v to see its log)"
        return fail(EXIT_DEVICE, f"{first.rstrip(':')}{hint}")
    except (ValueError, ImportError, FileNotFoundError) as exc:
        log.info("traceback:", exc_info=True)
        return fail(EXIT_USAGE, str(exc))
    except KeyboardInterrupt:
        return fail(130, "interrupted; everything measured or stored so far is kept")
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug: still one line; the traceback with -v
        log.info("traceback:", exc_info=True)
        hint = "" if verbose else " (run with -v for the traceback)"
        return fail(EXIT_DEVICE, f"internal error: {type(exc).__name__}: {exc}{hint}")
