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

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path

import psutil

from reir.datasets.synth import SynthConfig, generate
from reir.engine.gallery.follow import EVERY_S
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


def run(bundle: Path, work: Path, images: int = 1000, requests: int = 400, python: Path | None = None) -> dict:
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
    shutil.copytree(root / "main", root / "live")  # what the visibility runs add to and remove from
    texts = sorted({e.text for e in ds.split_expressions("test")})
    pool = _Texts(texts)
    out: dict = {"images": images, "instances": sum(len(n.detections.scores) for n in stored), "paths": {}}

    def batcher(follow_s=None) -> Batcher:
        return Batcher(SearchService.embedded(Engine.open(bundle, threads=2, cache=0), root, "main", follow_s=follow_s))

    single = Gallery.open(root / "main", progress=False)
    out["paths"]["embedded_threads"] = {
        "closed": {c: closed_loop(embedded_client(bundle, single), pool.take(requests), c) for c in CONCURRENCY[:3]}
    }
    single.close()
    b = batcher()
    out["ceiling"] = _ceiling(b, pool)
    out["paths"]["embedded_batched"] = _measure(lambda: b.search, pool, requests)
    b.close()
    b = batcher(follow_s=EVERY_S)
    out["visibility"] = {
        "embedded_batched": _visibility(lambda t: b.search(t, gallery="live"), root / "live", texts[0])
    }
    b.close()
    unloaded = out["paths"]["embedded_batched"]["closed"][1]["p50_ms"]
    out["triton"] = _triton(bundle, work, root, pool, requests, python or Path(".venv-triton/bin/python"), unloaded)
    if "closed" in out["triton"]:
        out["paths"]["triton_retrieve"] = out.pop("triton")
    with LocalCluster(nodes=2, cpus=2) as cluster:
        out["serve_floor"] = _serve_floor(serve, pool)
        for name, gallery in (("serve_1shard", "main"), ("serve_2shard", "shards-2")):
            url = start(build_app(bundle, root, [gallery, "live"], replicas=1, default=gallery), port=PORT)
            warm = ServeRetriever(url)
            for t in pool.take(8):
                warm.search(t)
            client = ServeRetriever(url)  # one connection per thread
            result = _measure(lambda u=url: ServeRetriever(u).search, pool, requests, client.search, cpu_at=16)
            result["one_client_added_ms"] = round(result["closed"][1]["p50_ms"] - unloaded, 2)
            if name == "serve_1shard":
                live = lambda t, u=url: ServeRetriever(u).search(t, gallery="live")  # noqa: E731
                out["visibility"][name] = _visibility(live, root / "live", texts[0])
            out["paths"][name] = result
            serve.delete("reir")
        serve.shutdown()
        out["nodes"] = cluster.nodes
    return out


def _triton(bundle: Path, work: Path, root: Path, pool, requests: int, python: Path, unloaded: float) -> dict | str:
    """Triton's `retrieve` over gRPC (the `pyort` configs: ONNX Runtime inside python models,
    dynamic batching on `retrieve` and the text encoder); why not, when its environment is missing."""
    if not python.exists():
        return f"Triton `retrieve` not measured: {python} not found (make triton-env builds it)"
    from reir.engine.serving.triton_client import TritonRetriever
    from reir.engine.serving.triton_server import TritonServer
    from reir.export.triton import write_repository

    repo = write_repository(bundle, work / "repo", root, "main")
    with TritonServer(repo, python, "pyort") as server:
        url = f"grpc://{server.grpc_url}"
        warm = TritonRetriever(url)
        for t in pool.take(8):
            warm.search(t)
        # retries=0: a refusal reaches the load generator, which counts it and waits
        result = _measure(lambda: TritonRetriever(url, retries=0).search, pool, requests)
    result["one_client_added_ms"] = round(result["closed"][1]["p50_ms"] - unloaded, 2)
    return result


def _serve_floor(serve, pool) -> dict:
    """What Ray Serve's HTTP path costs with nothing behind it: an empty deployment that
    reads the body and returns a fixed answer, at 1 and 16 clients, with CPU per request."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    from reir.engine.serving.serve_client import ServeRetriever

    empty = {"results": [{"hits": [], "truncated": False}], "partial": False, "missing_shards": []}

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
    class Empty:
        async def __call__(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse(empty)

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(Empty.bind(), name="empty", route_prefix="/empty", blocking=False)
    url = f"http://127.0.0.1:{PORT}/empty"
    for t in pool.take(8):
        ServeRetriever(url).search(t)
    out = {"1": closed_loop(lambda: ServeRetriever(url).search, pool.take(200), 1)}
    with _ProcessCPU() as cpu:
        out["16"] = closed_loop(lambda: ServeRetriever(url).search, pool.take(600), 16)
    out["16"]["cpu_ms_per_request"] = cpu.per_request(600)
    serve.delete("empty")
    return out


class _ProcessCPU:
    """CPU seconds each Ray Serve process spent during a block (proxy, front, shards, the rest of Ray)."""

    ROLES = (("ProxyActor", "proxy"), ("reir:Front", "front"), ("-shard-", "shards"), ("Empty", "deployment"))

    def __enter__(self) -> _ProcessCPU:
        self.before = self._now()
        return self

    def __exit__(self, *exc) -> None:
        self.after = self._now()

    def _now(self) -> dict[int, tuple[str, float]]:
        out = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "ray" not in cmd:
                continue
            role = next((r for key, r in self.ROLES if key in cmd), "ray_other")
            try:
                t = p.cpu_times()
                out[p.pid] = (role, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def per_request(self, n: int) -> dict[str, float]:
        spent: dict[str, float] = {}
        for pid, (role, t) in self.after.items():
            spent[role] = spent.get(role, 0.0) + t - self.before.get(pid, (role, 0.0))[1]
        return {role: round(1000 * v / n, 2) for role, v in sorted(spent.items()) if v > 0}


def _visibility(search, live: Path, text: str, rounds: int = 3) -> dict:
    """Seconds from a commit by a writer to the first answer that shows it, on a served
    path: an added image (a twin of the text's top image, so it ranks with it), then its
    removal. Polled every 20 ms."""
    adds, removals = [], []
    top = search(text).hits[0]
    for r in range(rounds):
        with Gallery.open(live, writable=True, progress=False) as writer:
            original = next(im for im in writer.stored() if im.path == top.path)
            twin = dataclasses.replace(original, path=f"{original.path}.twin{r}.png", sha256=f"{r:064x}")
            (new_id,) = writer.add([twin])
        adds.append(_until(lambda i=new_id: i in {h.image_id for h in search(text).hits}))
        with Gallery.open(live, writable=True, progress=False) as writer:
            writer.remove_images([new_id])
        removals.append(_until(lambda i=new_id: i not in {h.image_id for h in search(text).hits}))
    return {"add_s": adds, "remove_s": removals, "max_s": max(adds + removals)}


def _until(seen, limit_s: float = 30.0) -> float:
    start = time.perf_counter()
    while not seen():
        if time.perf_counter() - start > limit_s:
            raise RuntimeError(f"a committed change was not served within {limit_s:.0f} s")
        time.sleep(0.02)
    return round(time.perf_counter() - start, 3)


class _Texts:
    """Unique texts, handed out once each (cycled only when the test split runs out)."""

    def __init__(self, texts: list[str]):
        self.texts, self.at = texts, 0

    def take(self, n: int) -> list[str]:
        out = [self.texts[(self.at + i) % len(self.texts)] for i in range(n)]
        self.at += n
        return out


def _measure(make_search, pool: _Texts, requests: int, send=None, cpu_at: int | None = None) -> dict:
    """cpu_at: the closed-loop concurrency whose CPU time per Ray process is recorded too."""
    closed, cpu = {}, None
    for c in CONCURRENCY:
        n = requests if c < 64 else 2 * requests
        watch = _ProcessCPU() if c == cpu_at else contextlib.nullcontext()
        with watch:
            closed[c] = closed_loop(make_search, pool.take(n), c)
        if c == cpu_at:
            cpu = watch.per_request(n) | {"qps": closed[c]["qps"]}
    send = send or make_search()
    seconds = requests / 133  # 3 s per rate at the report's 400 requests
    sweep = [open_loop(send, pool.take(max(8, int(rate * seconds))), rate) for rate in RATES]
    k = knee(sweep)
    result = {"closed": closed, "open": sweep, "knee_qps": k}
    if cpu is not None:
        result[f"cpu_ms_per_request_{cpu_at}"] = cpu
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
