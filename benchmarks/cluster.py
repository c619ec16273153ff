"""The gallery on Ray, measured beside the embedded engine in one run.

Queries: the embedded engine (Retriever, in process) against the Ray Serve app with 1, 2
and 4 shards (one replica each), closed-loop load at concurrency 1, 4 and 16, unique
texts (no cache hit on either side). Indexing: images/s of `index_on_ray` with 1, 2 and 4
encoder actors beside one `reir index` process.

Everything runs on a local Ray cluster of two nodes on this host: on a 2-core machine the
numbers measure Ray's overhead (serialisation, the HTTP proxy, fan-out, actor hops), not a
speed-up; more workers than cores only compete.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from reir.datasets.synth import SynthConfig, generate
from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.engine import Engine

from .common import embedded_client
from .load import closed_loop

CONCURRENCY = (1, 4, 16)
SHARDS = (1, 2, 4)
WORKERS = (1, 2, 4)
PORT = 18831


def run(bundle: Path, work: Path, images: int = 1000, requests: int = 400, index_images_n: int = 200) -> dict:
    # Ray loads here, not at import: the report's other sections run without the cluster extra.
    # reir.cluster.local first: it keeps Ray on loopback, which must be set before Ray loads.
    from reir.cluster.local import LocalCluster  # isort: skip
    from ray import serve

    from reir.cluster.indexing import index_on_ray
    from reir.cluster.serving import build_app, start
    from reir.engine.serving.serve_client import ServeRetriever

    ds, _ = generate(work / "data", SynthConfig(images=images, seed=78, fractions=(0, 0, 1)), progress=False)
    paths = [ds.image_path(i) for i in sorted(ds.images)]
    engine = Engine.open(bundle, threads=1)
    root = work / "root"
    single = Gallery.for_bundle(root / "single", engine.bundle)
    t0 = time.perf_counter()
    single.add_images(paths, engine)
    one_process = len(paths) / (time.perf_counter() - t0)
    stored = list(single.stored())
    for s in SHARDS:
        with Gallery.create(root / f"shards-{s}", engine.dim, model=engine.model_id, shards=s) as g:
            g.add(stored)
    texts = sorted({e.text for e in ds.split_expressions("test")})[:requests]
    rows: dict = {}
    for c in CONCURRENCY:
        rows[f"embedded_c{c}"] = closed_loop(embedded_client(bundle, single), texts, c)
    indexing = {"images": min(index_images_n, len(paths)), "one_process_images_per_s": round(one_process, 1), "ray": {}}
    with LocalCluster(nodes=2, cpus=2) as cluster:
        for s in SHARDS:
            url = start(build_app(bundle, root, [f"shards-{s}"], replicas=1), port=PORT)
            ServeRetriever(url).search(texts[0])  # warm: the first call opens the sessions
            for c in CONCURRENCY:
                rows[f"serve_{s}shard_c{c}"] = closed_loop(lambda u=url: ServeRetriever(u).search, texts, c)
            serve.delete("reir")
        serve.shutdown()
        for w in WORKERS:
            target = work / f"ray-index-{w}"
            shutil.rmtree(target, ignore_errors=True)
            t = time.perf_counter()
            report = index_on_ray(paths[:index_images_n], target, bundle, shards=2, workers=w, progress=False)
            indexing["ray"][str(w)] = round(report.added / (time.perf_counter() - t), 1)
        nodes = cluster.nodes
    single.close()
    return {
        "images": images,
        "instances": sum(len(n.detections.scores) for n in stored),
        "requests": len(texts),
        "concurrency": list(CONCURRENCY),
        "shards": list(SHARDS),
        "nodes": nodes,
        "rows": rows,
        "indexing": indexing,
    }
