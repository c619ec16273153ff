"""Serving under load, every served path side by side in one run.

Paths: the embedded engine with a thread per client (what a naive integration does), the
embedded `Batcher` (engine/serving/batching.py), and the Ray Serve app with 1 and 2 shards
(one replica each, a local cluster of 2 nodes on this host). For each: closed-loop load at
1, 4, 16 and 64 clients (a refused client waits its Retry-After and sends again), an
open-loop sweep of arrival rates with latency from the scheduled send time (the knee: the
highest rate still served, p99 within 3x the lowest rate's), and an overload run at twice
the knee (how many are refused, how fast, and the admitted requests' p99).

Unique texts throughout and no text cache: every request costs a text encoding. The
ceiling is computed from per-request CPU time measured in the same run: 2 cores divided
by (one batch's encoding + search, per request).
"""

from __future__ import annotations

import time
from pathlib import Path

from reir.datasets.synth import SynthConfig, generate
from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.engine import Engine
from reir.engine.serving.batching import Batcher
from reir.engine.serving.contract import SearchRequest
from reir.engine.serving.service import SearchService

from .common import embedded_client
from .load import closed_loop, knee, open_loop

CONCURRENCY = (1, 4, 16, 64)
RATES = (20, 40, 60, 80, 100, 120, 140, 170, 200)
PORT = 18832


def run(bundle: Path, work: Path, images: int = 1000, requests: int = 400) -> dict:
    from reir.cluster.local import LocalCluster  # isort: skip  (keeps Ray on loopback; before Ray loads)
    from ray import serve

    from reir.cluster.serving import build_app, start
    from reir.engine.serving.serve_client import ServeRetriever

    ds, _ = generate(work / "data", SynthConfig(images=images, seed=78, fractions=(0, 0, 1)), progress=False)
    paths = [ds.image_path(i) for i in sorted(ds.images)]
    engine = Engine.open(bundle, threads=2)
    root = work / "root"
    with Gallery.for_bundle(root / "main", engine.bundle, progress=False) as g:
        g.add_images(paths, engine)
        stored = list(g.stored())
    with Gallery.create(root / "shards-2", engine.dim, model=engine.model_id, shards=2) as g:
        g.add(stored)
    texts = sorted({e.text for e in ds.split_expressions("test")})
    pool = _Texts(texts)
    out: dict = {"images": images, "instances": sum(len(n.detections.scores) for n in stored), "paths": {}}

    def batcher() -> Batcher:
        return Batcher(SearchService.embedded(Engine.open(bundle, threads=2, cache=0), root, "main", follow_s=None))

    single = Gallery.open(root / "main", progress=False)
    out["paths"]["embedded_threads"] = {
        "closed": {c: closed_loop(embedded_client(bundle, single), pool.take(requests), c) for c in CONCURRENCY[:3]}
    }
    b = batcher()
    out["ceiling"] = _ceiling(b, pool)
    out["paths"]["embedded_batched"] = _measure(lambda: b.search, pool, requests)
    b.close()
    single.close()
    with LocalCluster(nodes=2, cpus=2) as cluster:
        for name, gallery in (("serve_1shard", "main"), ("serve_2shard", "shards-2")):
            url = start(build_app(bundle, root, [gallery], replicas=1), port=PORT)
            warm = ServeRetriever(url)
            for t in pool.take(8):
                warm.search(t)
            client = ServeRetriever(url)  # one connection per thread
            out["paths"][name] = _measure(lambda u=url: ServeRetriever(u).search, pool, requests, client.search)
            out["paths"][name]["one_client_added_ms"] = round(
                out["paths"][name]["closed"][1]["p50_ms"] - out["paths"]["embedded_batched"]["closed"][1]["p50_ms"], 2
            )
            serve.delete("reir")
        serve.shutdown()
        out["nodes"] = cluster.nodes
    out["triton"] = "not in this section: Triton `retrieve` is measured by the end_to_end section"
    return out


class _Texts:
    """Unique texts, handed out once each (cycled only when the test split runs out)."""

    def __init__(self, texts: list[str]):
        self.texts, self.at = texts, 0

    def take(self, n: int) -> list[str]:
        out = [self.texts[(self.at + i) % len(self.texts)] for i in range(n)]
        self.at += n
        return out


def _measure(make_search, pool: _Texts, requests: int, send=None) -> dict:
    closed = {c: closed_loop(make_search, pool.take(requests if c < 64 else 2 * requests), c) for c in CONCURRENCY}
    send = send or make_search()
    seconds = requests / 133  # 3 s per rate at the report's 400 requests
    sweep = [open_loop(send, pool.take(max(8, int(rate * seconds))), rate) for rate in RATES]
    k = knee(sweep)
    result = {"closed": closed, "open": sweep, "knee_qps": k}
    if k:
        rate = 2 * k
        result["overload"] = open_loop(send, pool.take(max(8, int(rate * seconds))), rate) | {
            "unloaded_p99_ms": closed[1]["p99_ms"]
        }
    return result


def _ceiling(b: Batcher, pool: _Texts) -> dict:
    """Per-request CPU time of one batch of 16 (encode + search), and the queries/s two
    cores would give if nothing else ran."""
    service = b.service
    texts = pool.take(16 * 6)
    service.answer_batch([SearchRequest.of(t) for t in texts[:16]])
    t0 = time.process_time()
    for s in range(16, len(texts), 16):
        service.answer_batch([SearchRequest.of(t) for t in texts[s : s + 16]])
    per_request = (time.process_time() - t0) / (len(texts) - 16)
    return {"cpu_ms_per_request": round(1000 * per_request, 2), "two_core_qps": round(2 / per_request, 1)}
