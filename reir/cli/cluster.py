"""`reir cluster index|serve`: the gallery on Ray (the `cluster` extra; docs/cluster.md).

Without --address each command starts a Ray instance on this host, bound to 127.0.0.1;
with --address (e.g. `auto`, or the head's HOST:PORT) it joins a cluster you run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .common import add_tags, parse_tags, stop_on_signals, warn_if_exposed


def register(sub) -> None:
    c = sub.add_parser("cluster", help="index and serve galleries on a Ray cluster").add_subparsers(
        dest="cluster_command", required=True
    )
    p = c.add_parser("index", help="index images into a gallery (new: --shards, default 1) with Ray Data")
    p.add_argument("source", type=Path, help="image directory, list file, or Parquet manifest with a 'path' column")
    p.add_argument("--gallery", type=Path, required=True)
    p.add_argument("--shards", type=int, help="shards of a new gallery (default 1)")
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.add_argument("--workers", type=int, default=2, help="encoder actors (one ONNX Runtime session each)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=16)
    add_tags(p, "stored with every image added")
    p.add_argument("--address", help="a running Ray cluster (default: start one on this host, loopback only)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_index)

    p = c.add_parser("serve", help="serve galleries with Ray Serve (blocks; Ctrl-C or SIGTERM stops it)")
    p.add_argument("--root", type=Path, required=True, help="the gallery root; requests name galleries under it")
    p.add_argument("--gallery", nargs="+", required=True, help="gallery directory names under --root")
    p.add_argument("--default", help="the gallery of requests that name none (default: the only one served)")
    p.add_argument("--bundle", type=Path, help="default: the first gallery's bundle, else the shipped model")
    p.add_argument("--replicas", type=int, default=1, help="replicas per shard")
    p.add_argument("--deadline", type=float, default=5.0, help="seconds a request waits for its shards")
    p.add_argument("--encoder", help="a Triton server that encodes the text (grpc://HOST:8001), not ONNX Runtime here")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="a running Ray cluster (default: start one on this host, loopback only)")
    p.set_defaults(handler=_serve)


def _connect(address: str | None):
    # Ray loads inside the handlers: it is an optional extra and takes seconds to import.
    # Read at Ray's import: keep a Ray started here on 127.0.0.1 (docs/cluster.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a slow host: docs/cluster.md
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'clare-reir[cluster]'") from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)
    return ray


def _bundle(gallery: Path, given: Path | None) -> Path:
    from reir.engine.gallery.gallery import GalleryMeta, exists
    from reir.engine.runtime.bundle import default_bundle

    if exists(gallery):
        return GalleryMeta.read(gallery).bundle_path(given)
    return given or default_bundle()


def _index(args: argparse.Namespace) -> int:
    bundle = _bundle(args.gallery, args.bundle)
    ray = _connect(args.address)
    from reir.cluster.indexing import index_on_ray  # needs Ray, loaded above

    try:
        report = index_on_ray(
            args.source,
            args.gallery,
            bundle,
            args.shards,
            args.workers,
            args.batch,
            parse_tags(args.tags),
            args.gpus_per_worker,
            progress=not args.quiet,
        )
    finally:
        ray.shutdown()
    for p in report.problems:
        print(f"skipped: {p}", file=sys.stderr)
    print(report.summary())
    return 1 if report.problems else 0


def _serve(args: argparse.Namespace) -> int:
    root = args.root.resolve()
    bundle = _bundle(root / args.gallery[0], args.bundle)
    ray = _connect(args.address)
    from ray import serve

    from reir.cluster.serving import build_app, start

    stop_on_signals()
    warn_if_exposed(args.host, "the app")
    try:
        url = start(
            build_app(bundle, root, args.gallery, args.replicas, args.deadline, args.encoder, args.default),
            args.port,
            args.host,
        )
        print(f"ready: {url}  (reir search ... --server {url} --backend serve); Ctrl-C stops it", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
