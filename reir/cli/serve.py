"""`reir serve` (a real tritonserver on CPU) and `reir triton validate` (a repository, offline)."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from reir.engine.triton_server import NGC_COMMAND, TritonServer


def register(sub) -> None:
    t = sub.add_parser("triton", help="Triton model repository tools").add_subparsers(
        dest="triton_command", required=True
    )
    p = t.add_parser("validate", help="parse and check every config of a model repository offline")
    p.add_argument("repository", type=Path)
    p.set_defaults(handler=_triton_validate)

    p = sub.add_parser("serve", help="run tritonserver (CPU, from nvidia-pytriton) on a model repository")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"), help="the server environment")
    p.add_argument("--model-config-name", default="pyort")
    p.add_argument("--address", default="127.0.0.1", help="bind address; 0.0.0.0 exposes it to the network")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(handler=_serve)


def _triton_validate(args: argparse.Namespace) -> int:
    from reir.export.triton_validate import validate_repository  # protobuf from tritonclient: the triton extra

    problems = validate_repository(args.repository)
    for p in problems:
        print(f"problem: {p}")
    print("valid" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP (systemd, `docker stop`, Kubernetes) exit through the servers'
    `finally` blocks, so nothing is left behind. A shell starts background jobs with SIGINT
    ignored, and a child inherits that: take SIGINT back, or `kill -INT` would never stop it."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _serve(args: argparse.Namespace) -> int:
    stop_on_signals()
    server = TritonServer(
        args.repository,
        args.python,
        args.model_config_name,
        args.address,
        args.http_port,
        args.grpc_port,
        args.metrics_port,
    )
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.address}: the server is reachable from the network", file=sys.stderr)
    with server:
        print(f"ready: http://{server.http_url}  grpc://{server.grpc_url}  (pid {server.proc.pid}); Ctrl-C stops it")
        print("on a GPU host, the same repository in NGC's container:")
        print("  " + NGC_COMMAND.format(repo=args.repository.resolve(), gallery_root="/path/to/galleries"))
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0
