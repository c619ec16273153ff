"""`reir index`, `reir search` and `reir gallery info|check|rebuild|remove|sample`.

No torch: these run on a host that installed only `clare-reir[engine]`. Each handler
imports what it uses, so `reir search` loads no detector and no training code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import BACKENDS, add_tags, parse_tags, print_hits, remote_client


def register(sub) -> None:
    p = sub.add_parser("index", help="add images (a directory or a list file) to a gallery, resumably")
    p.add_argument("source", type=Path, help="image directory (recursive) or a text file with one path per line")
    p.add_argument("--gallery", type=Path, required=True)
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.add_argument("--batch", type=int, default=32)
    add_tags(p, "stored with every image added")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f16", help="stored vectors (new gallery)")
    p.add_argument("--shards", type=int, help="new gallery: split it into this many shards (docs/cluster.md)")
    p.add_argument(
        "--design", help="new gallery: its candidate index, projected-pq (default) or ivf-pq (docs/search.md)"
    )
    p.add_argument(
        "--min-score",
        type=float,
        help="new gallery: store only instances the detector scored this or more (each image keeps its best); "
        "0.1 keeps a third of the shipped model's at the same accuracy (docs/search.md)",
    )
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.add_argument("--device", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=_index)

    p = sub.add_parser("search", help="rank a gallery's images for one or more expressions")
    p.add_argument("expression", nargs="+")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--gallery", type=Path, help="a gallery directory, searched in this process")
    where.add_argument("--server", metavar="URL", help="a server: Triton (grpc://HOST:8001, http://HOST:8000) or Serve")
    p.add_argument("--backend", choices=BACKENDS, help="with --server: triton or serve (the Ray Serve app)")
    p.add_argument("--server-gallery", metavar="NAME", help="with --server: a gallery under the server's root")
    p.add_argument("--bundle", type=Path, help="with --gallery: default the gallery's bundle, else the shipped model")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--all-instances", action="store_true", help="every instance, not only the best per image")
    add_tags(p, "only images with all these tags")
    p.add_argument("--json", action="store_true", help="print the search contract's JSON response")
    p.add_argument("--show", type=Path, metavar="PNG", help="write a contact sheet of the hits (first expression)")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(handler=_search)

    g = sub.add_parser("gallery", help="inspect and maintain a gallery").add_subparsers(
        dest="gallery_command", required=True
    )
    for name, text, handler in [
        ("info", "counts, sizes, settings, measured agreement (JSON)", _info),
        ("check", "verify SQLite and the search index agree, and measure agreement again; exit 1 if not", _check),
        ("rebuild", "rebuild the search index from the embeddings in SQLite", _rebuild),
    ]:
        p = g.add_parser(name, help=text)
        p.add_argument("gallery", type=Path)
        p.set_defaults(handler=handler)
    p = g.add_parser("remove", help="remove images by id")
    p.add_argument("gallery", type=Path)
    p.add_argument("ids", type=int, nargs="+")
    p.set_defaults(handler=_remove)
    p = g.add_parser(
        "sample", help="refit the index to your own queries: encode a query log as the gallery's query sample"
    )
    p.add_argument("gallery", type=Path)
    p.add_argument("--texts", type=Path, required=True, help="one expression per line (e.g. a query log)")
    p.add_argument("--bundle", type=Path, help="default: the gallery's bundle, else the shipped model")
    p.set_defaults(handler=_sample)


def _index(args: argparse.Namespace) -> int:
    from reir.engine.gallery.gallery import Gallery, GalleryMeta, exists
    from reir.engine.gallery.ingest import list_images
    from reir.engine.runtime.bundle import default_bundle
    from reir.engine.runtime.engine import Engine

    paths, problems = list_images(args.source)
    if exists(args.gallery):
        bundle = GalleryMeta.read(args.gallery).bundle_path(args.bundle)
    else:
        bundle = args.bundle or default_bundle()
    engine = Engine.open(bundle, args.device, args.threads, args.batch)
    with Gallery.for_bundle(
        args.gallery,
        engine.bundle,
        args.shards,
        args.dtype,
        progress=not args.quiet,
        candidates=args.design,
        min_score=args.min_score,
    ) as g:
        report = g.add_images(paths, engine, parse_tags(args.tags), args.batch, progress=not args.quiet)
        info = g.info()
    report.problems[:0] = problems
    for p in report.problems:
        print(f"skipped: {p}", file=sys.stderr)
    print(report.summary())
    print(f"gallery {args.gallery}: {info.images} images, {info.instances} instances")
    return 1 if report.problems else 0


def _search(args: argparse.Namespace) -> int:
    from reir.engine.serving.contract import SearchRequest

    request = SearchRequest.of(
        args.expression, args.k, not args.all_instances, parse_tags(args.tags), args.server_gallery
    )
    if args.server:
        client = remote_client(args.server, args.backend)
        try:
            response = client.answer(request)
        finally:
            client.close()
        limit = "the model's max length"
    else:
        if args.backend or args.server_gallery:
            raise ValueError("--backend and --server-gallery go with --server, not --gallery")
        response, limit = _search_here(args, request)
    if response.partial:
        print(f"note: partial answer, shard(s) {list(response.missing_shards)} did not answer", file=sys.stderr)
    if args.json:
        print(json.dumps(response.to_json(), indent=2))
    else:
        for text, result in zip(request.texts, response.results, strict=True):
            print_hits(text, result, limit)
    if args.show:
        from reir.engine.drawing import hits_sheet

        hits_sheet(request.texts[0], response.results[0].hits).save(args.show)
        print(f"wrote {args.show}")
    return 0


def _search_here(args: argparse.Namespace, request):
    from reir.engine.gallery.gallery import Gallery
    from reir.engine.runtime.engine import Engine
    from reir.engine.serving.retriever import Retriever

    with Gallery.open(args.gallery, progress=True) as gallery:
        engine = Engine.open(gallery.meta.bundle_path(args.bundle), threads=args.threads)
        response = Retriever(engine, gallery).answer(request)
    return response, f"{engine.bundle.manifest['text']['max_length']} tokens"


def _open(path: Path, writable: bool = False):
    from reir.engine.gallery.gallery import Gallery

    return Gallery.open(path, writable=writable)


def _info(args: argparse.Namespace) -> int:
    with _open(args.gallery) as g:
        print(json.dumps(g.info().to_json(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    with _open(args.gallery) as g:
        problems = g.check()
        for p in problems:
            print(f"problem: {p}")
        for m in g.measure():
            print(("" if g.shard_count == 1 else f"shard {m.shard}: ") + m.summary())
        print("consistent" if not problems else f"{len(problems)} problem(s); `reir gallery rebuild` repairs the index")
    return 1 if problems else 0


def _rebuild(args: argparse.Namespace) -> int:
    with _open(args.gallery, writable=True) as g:
        g.rebuild(progress=True)
        print(f"rebuilt: {g.info().instances} vectors")
    return 0


def _remove(args: argparse.Namespace) -> int:
    with _open(args.gallery, writable=True) as g:
        print(f"removed {g.remove_images(args.ids)} image(s)")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from reir.engine.runtime.engine import Engine

    try:
        texts = [t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{args.texts}: cannot read ({e})") from None
    if len(texts) < 64:
        raise ValueError(f"{args.texts}: {len(texts)} expressions; a query sample needs at least 64")
    with _open(args.gallery, writable=True) as g:
        engine = Engine.open(g.meta.bundle_path(args.bundle))
        g.require_model(engine.model_id, engine.dim)
        g.set_query_sample(engine.encode_text(texts), progress=True)
        for part in g.info().per_shard:
            where = "" if g.shard_count == 1 else f"shard {part.shard}: "
            index = part.index
            print(f"{where}query sample: {len(texts)} expressions; index {index.kind}, agreement {index.agreement}")
    return 0
