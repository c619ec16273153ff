"""`reir index`, `reir search`, `reir gallery ...` and `reir eval --bundle`: the serving side.

No torch: these run on a host that installed only `clare-reir[engine]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def default_bundle() -> Path:
    """The bundle shipped with the package (models/synth, exported from configs/synth.yaml)."""
    from importlib.resources import files

    return Path(str(files("reir.models") / "synth"))


def _tags(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tags {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def add_parsers(sub) -> None:
    p = sub.add_parser("index", help="add images (a directory or a list file) to a gallery, resumably")
    p.add_argument("source", type=Path, help="image directory (recursive) or a text file with one path per line")
    p.add_argument("--gallery", type=Path, required=True)
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tags", nargs="*", metavar="KEY=VALUE", help="stored with every image added")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f16", help="stored vectors (new gallery)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("search", help="rank a gallery's images for an expression")
    p.add_argument("expression")
    p.add_argument("--gallery", type=Path, help="a local gallery (embedded engine)")
    p.add_argument("--server", help="query a Triton server instead, e.g. grpc://127.0.0.1:8001 or http://...")
    p.add_argument("--server-gallery", help="with --server: gallery name under the server's gallery root")
    p.add_argument("--bundle", type=Path)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--all-instances", action="store_true", help="every instance, not only the best per image")
    p.add_argument("--tags", nargs="*", metavar="KEY=VALUE", help="only images with these tags")
    p.add_argument("--json", action="store_true")
    p.add_argument("--show", type=Path, metavar="PNG", help="write a contact sheet of the hits")
    p.add_argument("--threads", type=int, default=0)

    g = sub.add_parser("gallery", help="inspect and maintain a gallery").add_subparsers(
        dest="gallery_command", required=True
    )
    for name, text in [
        ("info", "counts, sizes, settings"),
        ("check", "verify SQLite and the ANN index agree; exit 1 if not"),
        ("rebuild", "rebuild the ANN index from the embeddings in SQLite"),
    ]:
        p = g.add_parser(name, help=text)
        p.add_argument("gallery", type=Path)
    p = g.add_parser("remove", help="remove images by id")
    p.add_argument("gallery", type=Path)
    p.add_argument("ids", type=int, nargs="+")
    p = g.add_parser(
        "sample", help="refit the index to your own queries: encode a query log as the gallery's query sample"
    )
    p.add_argument("gallery", type=Path)
    p.add_argument("--texts", type=Path, required=True, help="one expression per line (e.g. a query log)")
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")

    t = sub.add_parser("triton", help="Triton model repository tools").add_subparsers(
        dest="triton_command", required=True
    )
    p = t.add_parser("validate", help="parse and check every config of a model repository offline")
    p.add_argument("repository", type=Path)

    p = sub.add_parser("serve", help="run tritonserver (CPU, from nvidia-pytriton) on a model repository")
    p.add_argument("--repository", type=Path, required=True)
    p.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"), help="the server environment")
    p.add_argument("--model-config-name", default="pyort")
    p.add_argument("--address", default="127.0.0.1", help="bind address; 0.0.0.0 exposes it to the network")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)


def run(args: argparse.Namespace) -> int:
    from reir.engine.bundle import BundleError
    from reir.engine.encoders import RuntimeUnavailable
    from reir.engine.gallery import GalleryError
    from reir.engine.image import ImageError
    from reir.engine.triton_client import TritonError
    from reir.engine.triton_server import ServerError

    try:
        if args.command == "index":
            return _index(args)
        if args.command == "search":
            return _search(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "triton":
            return _triton_validate(args)
        if args.command == "serve":
            return _serve(args)
        return _gallery(args)
    except (ValueError, BundleError, GalleryError, ImageError, RuntimeUnavailable, TritonError, ServerError) as e:
        print(f"reir: error: {e}", file=sys.stderr)
        return 2


def _bundle_for(gallery, given: Path | None) -> Path:
    """--bundle, else the bundle that indexed the (already open) gallery, else the shipped one."""
    if given is not None:
        return given
    if gallery is not None and gallery.bundle and Path(gallery.bundle).is_dir():
        return Path(gallery.bundle)
    return default_bundle()


def _index(args: argparse.Namespace) -> int:
    from reir.engine.engine import Engine
    from reir.engine.gallery import Gallery
    from reir.engine.indexer import index_images, list_images

    paths, problems = list_images(args.source)
    gallery = None
    if (args.gallery / "gallery.sqlite").is_file():
        gallery = Gallery.open(args.gallery, writable=True, progress=not args.quiet)
    try:
        engine = Engine.open(_bundle_for(gallery, args.bundle), args.device, args.threads, args.batch)
    except BaseException:
        if gallery is not None:
            gallery.close()
        raise
    if gallery is None:
        gallery = Gallery.create(
            args.gallery,
            engine.dim,
            args.dtype,
            model=engine.model_id,
            bundle=str(engine.bundle.path.resolve()),
            queries=engine.query_sample,
        )
    with gallery:
        if gallery.model != engine.model_id:
            raise ValueError(f"{args.gallery}: indexed with another model; pass that bundle or use a new gallery")
        report = index_images(gallery, engine, paths, _tags(args.tags), args.batch, progress=not args.quiet)
        info = gallery.info()
    report.problems[:0] = problems
    for p in report.problems:
        print(f"skipped: {p}", file=sys.stderr)
    print(report.summary())
    print(f"gallery {args.gallery}: {info['images']} images, {info['instances']} instances")
    return 1 if report.problems else 0


def _search(args: argparse.Namespace) -> int:
    from reir.engine.engine import Engine
    from reir.engine.gallery import Gallery
    from reir.engine.retriever import Retriever

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if args.server:
        from reir.engine.triton_client import TritonRetriever

        with TritonRetriever(args.server) as remote:
            hits = remote.search(args.expression, args.k, gallery=args.server_gallery)
            truncated = remote.last_truncated[0]
            limit = "the model's max length"
    elif args.gallery is None:
        raise ValueError("pass --gallery G (embedded engine) or --server URL (Triton)")
    else:
        with Gallery.open(args.gallery, progress=True) as gallery:
            engine = Engine.open(_bundle_for(gallery, args.bundle), threads=args.threads)
            retriever = Retriever(engine, gallery)
            hits = retriever.search(args.expression, args.k, per_image=not args.all_instances, tags=_tags(args.tags))
            truncated = retriever.last_truncated[0]
            limit = f"{engine.bundle.manifest['text']['max_length']} tokens"
    if args.json:
        out = {"expression": args.expression, "truncated": truncated, "hits": [h.__dict__ for h in hits]}
        print(json.dumps(out, indent=2))
    else:
        if truncated:
            print(f"note: the expression was truncated at {limit}")
        print(f"{'rank':>4}  {'score':>8}  {'image':>6}  {'box (x1, y1, x2, y2)':<28} path")
        for rank, h in enumerate(hits, 1):
            box = ", ".join(f"{v:.0f}" for v in h.box)
            print(f"{rank:>4}  {h.score:>8.3f}  {h.image_id:>6}  ({box}){'':<{max(0, 24 - len(box))}} {h.path}")
        if not hits:
            print("(the gallery is empty)")
    if args.show:
        from reir.engine.data.show import hits_sheet

        hits_sheet(args.expression, hits).save(args.show)
        print(f"wrote {args.show}")
    return 0


def _gallery(args: argparse.Namespace) -> int:
    from reir.engine.gallery import Gallery

    cmd = args.gallery_command
    with Gallery.open(args.gallery, writable=cmd in ("rebuild", "remove", "sample")) as g:
        if cmd == "info":
            print(json.dumps(g.info(), indent=2))
        elif cmd == "check":
            problems = g.check()
            for p in problems:
                print(f"problem: {p}")
            m = g.measure()
            if m is None:
                print("search: every query scans all vectors (no index: too small, or no query sample)")
            else:
                print(
                    f"search agrees with the exact scan on {m['queries']} held-out sample queries: "
                    f"top-1 {m['top1']:.4f}, top-10 images {m['top10']:.4f}, instance recall@10 {m['recall10']:.4f}"
                )
            print(
                "consistent"
                if not problems
                else f"{len(problems)} problem(s); `reir gallery rebuild` repairs the index"
            )
            return 1 if problems else 0
        elif cmd == "sample":
            from reir.engine.engine import Engine

            try:
                texts = [t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{args.texts}: cannot read ({e})") from None
            if len(texts) < 64:
                raise ValueError(f"{args.texts}: {len(texts)} expressions; a query sample needs at least 64")
            engine = Engine.open(_bundle_for(g, args.bundle))
            if g.model and g.model != engine.model_id:
                raise ValueError(f"{args.gallery}: indexed with another model than {engine.bundle.path}")
            g.set_query_sample(engine.encode_text(texts), progress=True)
            m = g.info()["index"]
            print(f"query sample: {len(texts)} expressions; index {m['kind']}, agreement {m.get('agreement')}")
        elif cmd == "rebuild":
            g.rebuild(progress=True)
            print(f"rebuilt: {g.info()['ann_vectors']} vectors")
        else:
            n = g.remove_images(args.ids)
            print(f"removed {n} image(s)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The training report, computed through the engine's ONNX graphs."""
    import tempfile

    from reir.engine.bundle import Bundle
    from reir.engine.data import load_dataset
    from reir.engine.gallery_ranker import GalleryRanker
    from reir.engine.protocol import evaluate_retrieval

    if args.checkpoint is not None:
        raise ValueError("pass a checkpoint or --bundle, not both")
    bundle = Bundle.open(args.bundle)
    ds = load_dataset(args.data)
    with tempfile.TemporaryDirectory(prefix="reir-eval-") as tmp:
        ranker = GalleryRanker(Path(tmp) / "gallery", bundle, progress=not args.quiet)
        report = evaluate_retrieval(
            bundle.visual_encoder(),
            bundle.text_encoder(),
            ds,
            args.split,
            bundle.input_hw,
            gallery_images=args.gallery_images,
            progress=not args.quiet,
            rank=ranker,
        )
        index = ranker.describe()
    m = bundle.manifest
    report.meta.update(
        {
            "bundle": str(args.bundle),
            "protocol": f"engine: NMS {m['nms_iou']:.2f}, top-{m['topk']}",
            "search": f"the gallery's search ({index['kind']}, {index['rows']} instances)",
        }
    )
    print(report.table())
    exact = report.meta["exact_protocol"]
    keys = [k for k in ("mBR@1(0.5)", "mBR@5(0.5)", "mBR@10(0.5)", "BR@1(0.5)") if k in exact]
    print("through the gallery's search vs the exact protocol (every instance scored in memory):")
    print("  " + ", ".join(f"{k} {report.metrics[k]:.2f} vs {exact[k]:.2f}" for k in keys))
    report.write(args.json, args.md)
    return 0


def _triton_validate(args: argparse.Namespace) -> int:
    from reir.export.triton_validate import validate_repository

    problems = validate_repository(args.repository)
    for p in problems:
        print(f"problem: {p}")
    print("valid" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def _serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from reir.engine.triton_server import NGC_COMMAND, TritonServer

    def stop(signum, _frame):  # systemd, `docker stop`, Kubernetes send SIGTERM: leave nothing behind
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)

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
