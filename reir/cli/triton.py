"""`reir triton export|validate|serve`: a Triton model repository, checked offline, served here.

reir triton export BUNDLE --out REPO --gallery GALLERY    the repository (configs + graphs)
reir triton validate REPO                                 parse and check every config offline
reir triton serve --repository REPO                       a real tritonserver on CPU, loopback
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .common import stop_on_signals, warn_if_exposed


def register(sub) -> None:
    t = sub.add_parser("triton", help="the Triton model repository: export, validate, serve").add_subparsers(
        dest="triton_command", required=True
    )
    p = t.add_parser("export", help="write a Triton model repository for a bundle and a gallery root")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="repository directory to write (atomically)")
    p.add_argument("--gallery", type=Path, required=True, help="the default gallery; its parent is the gallery root")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_export)

    p = t.add_parser("validate", help="parse and check every config of a model repository offline")
    p.add_argument("repository", type=Path)
    p.set_defaults(handler=_validate)

    p = t.add_parser("serve", help="run tritonserver (CPU, from nvidia-pytriton) on a model repository")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"), help="the server environment")
    p.add_argument("--model-config-name", default="pyort")
    p.add_argument("--address", default="127.0.0.1", help="bind address; 0.0.0.0 exposes it to the network")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.set_defaults(handler=_serve)


def _report(problems: list[str]) -> None:
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    from reir.export.triton import write_repository
    from reir.export.triton_validate import validate_repository  # protobuf from tritonclient: the triton extra

    repo = write_repository(args.bundle, args.out, args.gallery.parent, args.gallery.name, args.overwrite)
    problems = validate_repository(repo)
    _report(problems)
    print(f"wrote {repo}" + (f" with {len(problems)} problem(s)" if problems else " (validated)"))
    return 1 if problems else 0


def _validate(args: argparse.Namespace) -> int:
    from reir.export.triton_validate import validate_repository

    problems = validate_repository(args.repository)
    _report(problems)
    print("valid" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _serve(args: argparse.Namespace) -> int:
    from reir.engine.serving.triton_server import NGC_COMMAND, TritonServer

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
    warn_if_exposed(args.address, "the server")
    with server:
        print(f"ready: http://{server.http_url}  grpc://{server.grpc_url}  (pid {server.proc.pid}); Ctrl-C stops it")
        print("on a GPU host, the same repository in NGC's container:")
        print("  " + NGC_COMMAND.format(repo=args.repository.resolve(), gallery_root="/path/to/galleries"), flush=True)
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0
