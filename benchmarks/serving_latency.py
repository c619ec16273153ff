"""Query latency of `retrieve` through a real tritonserver (gRPC, HTTP) beside the embedded engine.

    python -m reir.benchmarks.serving_latency [--bundle models/synth] [--images 300] [--requests 200]

Builds a gallery, writes the Triton repository, starts nvidia-pytriton's tritonserver on
127.0.0.1 (`.venv-triton`, config `pyort`), and sends the same expressions at concurrency
1 and 8 (threads, one client each). Every number is from this one run on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _run(make_search, texts: list[str], concurrency: int) -> dict[str, float]:
    def worker(chunk):
        search = make_search()
        out = []
        for t in chunk:
            t0 = time.perf_counter()
            search(t)
            out.append(time.perf_counter() - t0)
        return out

    chunks = [texts[i::concurrency] for i in range(concurrency)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = np.array([x for part in pool.map(worker, chunks) for x in part]) * 1000
    wall = time.perf_counter() - t0
    return {
        "p50_ms": round(float(np.median(lat)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "qps": round(len(texts) / wall, 1),
    }


def main(argv: list[str] | None = None) -> int:
    from reir.engine.cli import default_bundle
    from reir.engine.engine import Engine
    from reir.engine.gallery import Gallery
    from reir.engine.retriever import Retriever
    from reir.engine.synth import SynthConfig, generate
    from reir.engine.triton_client import TritonRetriever
    from reir.engine.triton_server import TritonServer
    from reir.export.triton import write_repository

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--python", type=Path, default=Path(".venv-triton/bin/python"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="reir-serving-"))
    bundle = args.bundle or default_bundle()
    try:
        ds, _ = generate(work / "data", SynthConfig(images=args.images, seed=78, fractions=(0, 0, 1)), progress=False)
        engine = Engine.open(bundle, threads=1)
        g = Gallery.create(work / "galleries" / "main", engine.dim, model=engine.model_id)
        g.add_images([ds.image_path(i) for i in sorted(ds.images)], engine)
        g.close()
        texts = [e.text for e in sorted(ds.split_expressions("test"), key=lambda e: e.id)]
        texts = (texts * (args.requests // max(len(texts), 1) + 1))[: args.requests]
        repo = write_repository(bundle, work / "repo", work / "galleries", "main")
        local_gallery = Gallery.open(work / "galleries" / "main", progress=False)
        rows = {}
        for c in (1, 8):

            def embedded():
                e = Engine.open(bundle, threads=1)
                r = Retriever(e, local_gallery)

                def search(t):
                    e._cache.clear()
                    return r.search(t, k=10)

                return search

            rows[f"embedded_c{c}"] = _run(embedded, texts, c)
        with TritonServer(repo, args.python, "pyort") as server:
            for proto, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                for c in (1, 8):
                    rows[f"triton_{proto}_c{c}"] = _run(lambda u=url, p=proto: TritonRetriever(u, p).search, texts, c)
        out = {"cores": os.cpu_count(), "images": args.images, "requests": args.requests, "rows": rows}
        print(json.dumps(out, indent=2))
        if args.json:
            from reir.engine.fsutil import write_json_atomic

            write_json_atomic(args.json, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
