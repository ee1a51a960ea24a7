"""`netadapt-device serve`: the daemon's command line. Parses arguments and waits; nothing else."""

from __future__ import annotations

import argparse
import os
import sys

from device_server.logs import configure_logging
from device_server.measurer import Limits
from device_server.server import ServerConfig, serve

__all__ = ["main"]


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        message = f"netadapt-device: cannot read token file {path}: {exc.strerror}"
        raise SystemExit(message) from None
    if not token:
        raise SystemExit(f"netadapt-device: token file {path} is empty")
    return token


def _cpu_list(text: str) -> set[int]:
    """'0', '4-7' or '0,2,4-5' -> a set of CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a CPU list: {text!r} (e.g. 0, 4-7 or 0,2)") \
            from None
    return cpus


def _pin(cpus: set[int]) -> None:
    """Before any thread starts, so ONNX Runtime's and gRPC's threads inherit the mask."""
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, AttributeError) as exc:
        raise SystemExit(f"netadapt-device: cannot pin to CPUs {sorted(cpus)}: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="netadapt-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the measurement daemon")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    s.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    s.add_argument("--port-file", help="write the bound port here once serving")
    s.add_argument("--token-file", help="file holding the bearer token clients must send")
    s.add_argument("--tls-cert", help="PEM certificate (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind with neither token nor TLS")
    s.add_argument("--cpus", type=_cpu_list,
                   help="pin the daemon to these CPUs, e.g. 0 or 4-7 (a phone's big cores)")
    s.add_argument("--threads", type=int, default=1,
                   help="default ONNX Runtime intra-op threads (default 1)")
    s.add_argument("--max-queue", type=int, default=Limits.max_queue_depth)
    s.add_argument("--max-measure-s", type=float, default=Limits.max_measure_s)
    s.add_argument("--max-tensor-mib", type=float, default=Limits.max_tensor_mib)
    s.add_argument("--max-model-mib", type=float, default=Limits.max_model_mib)
    s.add_argument("--cancel-grace-s", type=float, default=Limits.cancel_grace_s,
                   help="how long an abandoned measurement may take to stop before its worker "
                        "is killed and restarted (default %(default)s)")
    s.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started the daemon exits (a host's "
                        "loopback daemon)")
    s.add_argument("--log-level", default=os.environ.get("NETADAPT_LOG", "INFO"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configure_logging(args.log_level)
    except ValueError:
        print(f"netadapt-device: unknown --log-level {args.log_level!r} (DEBUG, INFO, WARNING, "
              f"ERROR)", file=sys.stderr)
        return 2
    if args.threads < 1:
        print("netadapt-device: --threads must be >= 1", file=sys.stderr)
        return 2
    if args.cpus:
        _pin(args.cpus)
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=_read_token(args.token_file) if args.token_file else None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure=args.insecure,
        threads=args.threads,
        limits=Limits(
            max_queue_depth=args.max_queue,
            max_measure_s=args.max_measure_s,
            max_tensor_mib=args.max_tensor_mib,
            max_model_mib=args.max_model_mib,
            cancel_grace_s=args.cancel_grace_s,
        ),
    )
    try:
        serve(config, port_file=args.port_file,
              parent_pid=os.getppid() if args.exit_with_parent else None)
    except (ValueError, OSError) as exc:
        print(f"netadapt-device: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
