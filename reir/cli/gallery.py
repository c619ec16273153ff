"""`reir index`, `reir search` and `reir gallery info|check|rebuild|remove|sample`.

No torch: these run on a host that installed only `clare-reir[engine]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reir.engine.bundle import default_bundle
from reir.engine.drawing import hits_sheet
from reir.engine.engine import Engine
from reir.engine.gallery import Gallery
from reir.engine.indexer import index_images, list_images
from reir.engine.retriever import Retriever
from reir.engine.serve_client import ServeRetriever
from reir.engine.sharded_gallery import ShardedGallery, is_sharded, open_gallery
from reir.engine.triton_client import TritonRetriever


def _tags(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--tags {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def register(sub) -> None:
    p = sub.add_parser("index", help="add images (a directory or a list file) to a gallery, resumably")
    p.add_argument("source", type=Path, help="image directory (recursive) or a text file with one path per line")
    p.add_argument("--gallery", type=Path, required=True)
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tags", nargs="*", metavar="KEY=VALUE", help="stored with every image added")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f16", help="stored vectors (new gallery)")
    p.add_argument("--shards", type=int, help="new gallery: split it into this many shards (docs/cluster.md)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_index)

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
    p.set_defaults(handler=_search)

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
        p.set_defaults(handler=_gallery)
    p = g.add_parser("remove", help="remove images by id")
    p.add_argument("gallery", type=Path)
    p.add_argument("ids", type=int, nargs="+")
    p.set_defaults(handler=_gallery)
    p = g.add_parser(
        "sample", help="refit the index to your own queries: encode a query log as the gallery's query sample"
    )
    p.add_argument("gallery", type=Path)
    p.add_argument("--texts", type=Path, required=True, help="one expression per line (e.g. a query log)")
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.set_defaults(handler=_gallery)


def _bundle_for(gallery, given: Path | None) -> Path:
    """--bundle, else the bundle that indexed the (already open) gallery, else the shipped one."""
    if given is not None:
        return given
    if gallery is not None and gallery.bundle and Path(gallery.bundle).is_dir():
        return Path(gallery.bundle)
    return default_bundle()


def _index(args: argparse.Namespace) -> int:

    paths, problems = list_images(args.source)
    gallery = None
    exists = (args.gallery / "gallery.sqlite").is_file() or is_sharded(args.gallery)
    if exists:
        gallery = open_gallery(args.gallery, writable=True, progress=not args.quiet)
        if args.shards is not None and getattr(gallery, "count", 1) != args.shards:
            gallery.close()
            raise ValueError(
                f"{args.gallery}: exists with {getattr(gallery, 'count', 1)} shard(s), not --shards {args.shards}"
            )
    try:
        engine = Engine.open(_bundle_for(gallery, args.bundle), args.device, args.threads, args.batch)
    except BaseException:
        if gallery is not None:
            gallery.close()
        raise
    if gallery is None:
        made = dict(model=engine.model_id, bundle=str(engine.bundle.path.resolve()), queries=engine.query_sample)
        if args.shards is not None:
            gallery = ShardedGallery.create(args.gallery, args.shards, engine.dim, args.dtype, **made)
        else:
            gallery = Gallery.create(args.gallery, engine.dim, args.dtype, **made)
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

    if args.k < 1:
        raise ValueError(f"-k must be at least 1, got {args.k}")
    if args.server and args.server.startswith("ray://"):
        remote = ServeRetriever(args.server, gallery=args.server_gallery)
        hits = remote.search(args.expression, args.k, per_image=not args.all_instances, tags=_tags(args.tags))
        truncated, limit = remote.last_truncated[0], "the model's max length"
        if remote.last_partial:
            print(f"note: partial answer, shard(s) {remote.last_missing} did not answer", file=sys.stderr)
    elif args.server:
        with TritonRetriever(args.server) as remote:
            hits = remote.search(args.expression, args.k, gallery=args.server_gallery)
            truncated = remote.last_truncated[0]
            limit = "the model's max length"
    elif args.gallery is None:
        raise ValueError("pass --gallery G (embedded engine) or --server URL (Triton)")
    else:
        with open_gallery(args.gallery, progress=True) as gallery:
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
        hits_sheet(args.expression, hits).save(args.show)
        print(f"wrote {args.show}")
    return 0


def _gallery(args: argparse.Namespace) -> int:

    cmd = args.gallery_command
    with open_gallery(args.gallery, writable=cmd in ("rebuild", "remove", "sample")) as g:
        if cmd == "info":
            print(json.dumps(g.info(), indent=2))
        elif cmd == "check":
            problems = g.check()
            for p in problems:
                print(f"problem: {p}")
            measured = g.measure()
            for where, m in _per_shard(g, measured if isinstance(measured, list) else [measured]):
                if m is None:
                    print(f"{where}search: every query scans all vectors (no index: too small, or no query sample)")
                else:
                    print(
                        f"{where}search agrees with the exact scan on {m['queries']} held-out sample queries: "
                        f"top-1 {m['top1']:.4f}, top-10 images {m['top10']:.4f}, "
                        f"instance recall@10 {m['recall10']:.4f}"
                    )
            print(
                "consistent"
                if not problems
                else f"{len(problems)} problem(s); `reir gallery rebuild` repairs the index"
            )
            return 1 if problems else 0
        elif cmd == "sample":
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
            info = g.info()
            for where, part in _per_shard(g, info.get("per_shard", [info])):
                m = part["index"]
                print(
                    f"{where}query sample: {len(texts)} expressions; index {m['kind']}, agreement {m.get('agreement')}"
                )
        elif cmd == "rebuild":
            g.rebuild(progress=True)
            print(f"rebuilt: {g.info()['instances']} vectors")
        else:
            n = g.remove_images(args.ids)
            print(f"removed {n} image(s)")
    return 0


def _per_shard(g, parts: list) -> list[tuple[str, object]]:
    """(prefix, part) per shard of a sharded gallery; one unprefixed part otherwise."""
    if len(parts) == 1 and not isinstance(g, ShardedGallery):
        return [("", parts[0])]
    return [(f"shard {s}: ", p) for s, p in enumerate(parts)]
