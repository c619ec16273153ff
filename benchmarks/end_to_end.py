"""End-to-end query latency and throughput: the embedded engine, Triton gRPC and Triton HTTP.

    python -m reir.benchmarks.end_to_end [--bundle models/synth] [--images 1000] [--requests 400]

Builds a gallery, writes the Triton repository, starts nvidia-pytriton's tritonserver on
127.0.0.1 (`.venv-triton`, config `pyort`), and sends the same expressions at concurrency
1, 4 and 16: our own closed-loop load generator, one thread and one client per concurrent
user, each sending its next query when the last one answered (perf_analyzer does not run
on this OS). A query is text in, ranked hits out: text encoding (the LRU cache bypassed in
the embedded engine; Triton has none), ANN search, hit metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from reir.datasets.synth import SynthConfig, generate
from reir.engine.fsutil import write_json_atomic
from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.bundle import default_bundle
from reir.engine.runtime.engine import Engine
from reir.engine.serving.triton_client import TritonRetriever
from reir.engine.serving.triton_server import TritonServer
from reir.export.triton import write_repository

from .common import embedded_client
from .load import closed_loop

CONCURRENCY = (1, 4, 16)


def run(bundle: Path, work: Path, images: int = 1000, requests: int = 400, python: Path | None = None) -> dict:
    """Rows keyed `<server>_c<concurrency>`; Triton rows are left out (with the reason) when
    its environment is missing."""

    ds, _ = generate(work / "data", SynthConfig(images=images, seed=78, fractions=(0, 0, 1)), progress=False)
    engine = Engine.open(bundle, threads=1)
    g = Gallery.create(work / "galleries" / "main", engine.dim, model=engine.model_id)
    g.add_images([ds.image_path(i) for i in sorted(ds.images)], engine, progress=False)
    g.close()
    texts = [e.text for e in sorted(ds.split_expressions("test"), key=lambda e: e.id)]
    texts = (texts * (requests // max(len(texts), 1) + 1))[:requests]
    local_gallery = Gallery.open(work / "galleries" / "main", progress=False)
    rows: dict = {}
    for c in CONCURRENCY:
        rows[f"embedded_c{c}"] = closed_loop(embedded_client(bundle, local_gallery), texts, c)
    out = {"images": images, "requests": requests, "concurrency": list(CONCURRENCY), "rows": rows}
    python = python or Path(".venv-triton/bin/python")
    if not python.exists():
        out["triton_skipped"] = f"{python} not found (make triton-env builds tritonserver's environment)"
        return out

    repo = write_repository(bundle, work / "repo", work / "galleries", "main")
    with TritonServer(repo, python, "pyort") as server:
        for proto, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            for c in CONCURRENCY:
                client = lambda u=f"{proto}://{url}": TritonRetriever(u).search  # noqa: E731
                rows[f"triton_{proto}_c{c}"] = closed_loop(client, texts, c)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="reir-serving-"))
    try:
        out = run(args.bundle or default_bundle(), work, args.images, args.requests, args.python)
        out["cores"] = os.cpu_count()
        print(json.dumps(out, indent=2))
        if args.json:
            write_json_atomic(args.json, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
