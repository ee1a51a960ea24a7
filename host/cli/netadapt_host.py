"""`netadapt-host`: the host side's command line.

    netadapt-host --device HOST:PORT [adapt options]    (the brief's usage: `adapt` implied)
    netadapt-host adapt --budget 0.5 [--device HOST:PORT] …
    netadapt-host lut build|validate|info|export|import …

With no `--device`, commands start a measurement daemon on loopback for the run; with no
sub-command at all, `adapt` runs the built-in task (MobileNetV1 on the shipped MNIST digits).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from host.cli.adapt import add_adapt_command
from host.cli.common import CliParser, parse_command_line, run_command
from host.cli.lut import add_lut_commands

__all__ = ["main", "build_parser"]

PROG = "netadapt-host"


_Parser = CliParser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_adapt_command(sub)
    add_lut_commands(sub)
    return parser


COMMANDS = ("adapt", "lut")
_GLOBAL_FLAGS = ("-v", "--verbose")


def with_default_command(argv: Sequence[str]) -> list[str]:
    """`adapt` where no sub-command is named: `--device H:P --budget 0.6` means adapt."""
    args = list(argv)
    i = 0
    while i < len(args) and args[i] in _GLOBAL_FLAGS:
        i += 1
    if i < len(args) and (args[i] in COMMANDS or args[i] in ("-h", "--help")):
        return args
    return [*args[:i], "adapt", *args[i:]]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    argv = with_default_command(sys.argv[1:] if argv is None else argv)
    args = parse_command_line(build_parser(), argv, err or sys.stderr)
    if isinstance(args, int):
        return args
    return run_command(PROG, lambda: int(args.run(args, out)), err, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
