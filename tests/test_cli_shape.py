"""The command line a newcomer meets: the brief's invocation works, and every option says what
it does and its default."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from host.cli.netadapt_host import build_parser, main, with_default_command


def test_the_brief_invocation_means_adapt(tmp_path: Path) -> None:
    assert with_default_command(["--device", "h:1"]) == ["adapt", "--device", "h:1"]
    assert with_default_command(["-v", "--budget", "0.6"]) == ["-v", "adapt", "--budget", "0.6"]
    assert with_default_command([]) == ["adapt"]
    assert with_default_command(["lut", "info", "x"]) == ["lut", "info", "x"]
    assert with_default_command(["--help"]) == ["--help"]
    # `netadapt-host --device HOST:PORT --budget 0.6 --workdir W` reaches the device (none is
    # listening on port 9 here): one line naming it, exit 1 -- not a usage error.
    err = io.StringIO()
    code = main(["--device", "127.0.0.1:9", "--budget", "0.6", "--workdir",
                 str(tmp_path / "w")], out=io.StringIO(), err=err)
    assert code == 1, err.getvalue()
    assert "127.0.0.1:9" in err.getvalue() and err.getvalue().count("\n") == 1
    assert "invalid choice" not in err.getvalue()


@pytest.mark.parametrize(("option", "value", "said"), [
    ("--budget-margin", "0.7", "budget margin"), ("--budget-margin", "-0.01", "budget margin"),
    ("--resolve-savings", "-1", "resolve_savings must be >= 0"),
])
def test_a_setting_out_of_range_is_one_line_before_any_work(tmp_path: Path, option: str,
                                                            value: str, said: str) -> None:
    err = io.StringIO()
    code = main(["--device", "127.0.0.1:9", option, value, "--workdir",
                 str(tmp_path / "w")], out=io.StringIO(), err=err)
    assert code != 0 and err.getvalue().count("\n") == 1, err.getvalue()
    assert said in err.getvalue() and "127.0.0.1:9" not in err.getvalue()
    assert not (tmp_path / "w").exists()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return out


def test_every_adapt_option_has_help_and_shows_its_default() -> None:
    adapt = _subparsers(build_parser())["adapt"]
    text = adapt.format_help()
    for action in adapt._actions:
        if not action.option_strings:
            continue
        assert action.help, f"adapt {action.option_strings[0]} has no help text"
    for shown in ("(default: 0.025)", "(default: 0.96)", "(default: latency)",
                  "(default: 8)", "(default: 0)", "(default: 0.02)", "default 6",
                  "default: start one on"):
        assert shown in text, shown


def test_every_option_of_every_command_has_help() -> None:
    from host.cli import netadapt_bench, netadapt_deploy

    parsers: dict[str, argparse.ArgumentParser] = {}
    for prog, parser in (("netadapt-host", build_parser()),
                         ("netadapt-bench", netadapt_bench.build_parser()),
                         ("netadapt-deploy", netadapt_deploy.build_parser())):
        parsers[prog] = parser
        parsers.update({f"{prog} {k}": v for k, v in _subparsers(parser).items()})
    missing = [f"{name} {a.option_strings[0]}" for name, p in parsers.items()
               for a in p._actions if a.option_strings and not a.help]
    assert not missing, missing
    assert len(parsers) >= 15  # the commands themselves were found


def test_one_set_of_device_options_in_every_command_line() -> None:
    """`--device`, `--token-file`, `--threads`, `--provider`, `--tls-root-cert`: the same flags,
    defaults and help in netadapt-host's commands
    and netadapt-bench; netadapt-deploy's `--threads` (the daemon's default) is the same too."""
    from host.cli import netadapt_bench, netadapt_deploy

    host = _subparsers(build_parser())
    deploy = _subparsers(netadapt_deploy.build_parser())["deploy"]
    commands = {"netadapt-bench": netadapt_bench.build_parser(), "adapt": host["adapt"],
                "lut build": host["lut build"], "lut validate": host["lut validate"]}

    def options(p: argparse.ArgumentParser) -> dict[str, tuple[object, ...]]:
        return {a.option_strings[-1]: (a.default, a.help, a.type, a.metavar)
                for a in p._actions if a.option_strings}

    shared = ("--device", "--token-file", "--threads", "--provider")
    seen = {name: {k: v for k, v in options(p).items() if k in shared}
            for name, p in commands.items()}
    first = seen["netadapt-bench"]
    assert set(first) == set(shared)
    assert all(s == first for s in seen.values()), seen
    assert first["--threads"][0] == 1
    assert options(deploy)["--threads"] == first["--threads"]
    tls = {name: options(p).get("--tls-root-cert") for name, p in commands.items()}
    assert len(set(tls.values())) == 1 and None not in tls.values(), tls
    # bench measures on one device: two are refused before anything is started.
    err = io.StringIO()
    code = netadapt_bench.main(["--device", "127.0.0.1:9", "--device", "127.0.0.1:8", "info"],
                               out=io.StringIO(), err=err)
    assert code == 2 and "--device was given 2 times" in err.getvalue()
