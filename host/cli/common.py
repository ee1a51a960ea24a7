"""Options and error handling shared by the `netadapt-host` commands: which model, which
devices, which session; and the one place exceptions become a one-line message and an exit
code."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from device_server.errors import InvalidConfigError
from device_server.spec import DEFAULT_PROVIDER, SessionSpec
from host.device.client import DeviceError
from host.device.connect import TokenFileError, read_token
from host.device.local_daemon import DaemonStartError
from host.device.pool import FingerprintMismatch

__all__ = ["CliParser", "CommandError", "DefaultsHelpFormatter", "EXIT_DEVICE", "EXIT_USAGE",
           "EXIT_NOT_SERVING",
           "add_device_options",
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


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", action="append", default=[], metavar="HOST:PORT",
                   help="a measurement daemon; repeat for a pool of alike devices (default: "
                        "start one on loopback)")
    p.add_argument("--token-file", help="bearer token for the daemons")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (default 1)")
    p.add_argument("--provider", default=DEFAULT_PROVIDER, help="execution provider")


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
                        f"fewest with a 95%% interval of the median)")
    g.add_argument("--max-rounds", type=int, default=d.max_rounds,
                   help=f"most rounds before a figure is reported not tight (default "
                        f"{d.max_rounds})")
    g.add_argument("--target-halfwidth", type=float, default=d.target_halfwidth,
                   help=f"stop when every 95%% interval is within this fraction of its figure "
                        f"(default {d.target_halfwidth}, i.e. +-{100 * d.target_halfwidth:.1f}%%)")


def protocol_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The WholeModelProtocol the options above ask for."""
    from host.device.whole_model import WholeModelProtocol

    try:
        return WholeModelProtocol(min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                                  target_halfwidth=args.target_halfwidth)
    except ValueError as exc:
        raise CommandError(f"{exc} (--min-rounds, --max-rounds, --target-halfwidth)") from None


def token_from_args(args: argparse.Namespace) -> str | None:
    return read_token(args.token_file) if args.token_file else None


def session_from_args(args: argparse.Namespace) -> SessionSpec:
    if args.threads < 1:
        raise CommandError("--threads must be >= 1")
    provider = args.provider
    if not provider.endswith("ExecutionProvider"):
        provider = f"{provider}ExecutionProvider"
    return SessionSpec(provider=provider, intra_op_threads=args.threads)


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
