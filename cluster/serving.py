"""Sharded search on Ray Serve: a front deployment encodes the expression and fans out to
one deployment per shard (R replicas each), then merges the per-shard top-k exactly.

    POST /reir  {"text": "the red circle", "k": 10, "per_image": true, "tags": null, "gallery": "main"}
    200  {"results": [{"hits": [...], "truncated": false}], "partial": false, "missing_shards": []}
    4xx  {"error": "k must be in [1, 100], got 0"}

A shard that does not answer within the request's deadline (its replicas are all down or
stuck) after retries is left out and named: `partial: true`, `missing_shards: [2]`. A
caller never waits past the deadline and never gets a silent gap. A failed call is retried
on another replica of the same shard, so losing one replica loses no query.

Shard replicas open their gallery read-only; its vectors are memory-mapped, so replicas on
one node share the page cache. Everything binds to the node's address (127.0.0.1 on a
local cluster); see `bind_replica_grpc_to_node`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from starlette.requests import Request
from starlette.responses import JSONResponse

from reir.engine.bundle import Bundle
from reir.engine.engine import Engine
from reir.engine.gallery import Gallery
from reir.engine.serve_client import hit_from_json
from reir.engine.sharded_gallery import global_hit, is_sharded, merge_hits, read_manifest, shard_dir

MAX_K = 100
MAX_TEXTS = 64


def bind_replica_grpc_to_node() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on [::]:0, every
    interface. Rebind it to the node's own address (what Ray uses for the node; loopback on
    a local cluster), so a replica listens where its node does and nowhere else. Each
    deployment's constructor calls it: that runs in the replica process before the server
    starts (Serve pickles a deployment class by value, so a module-level call would not)."""
    from ray.serve._private import replica

    if getattr(replica, "_reir_bound", False):
        return
    original = replica.add_port_to_grpc_server

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = f"{ray.util.get_node_ip_address()}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    replica.add_port_to_grpc_server = add_port
    replica._reir_bound = True


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ShardSearch:
    """One shard of one gallery, read-only; answers in global ids."""

    def __init__(self, path: str, shard: int, shards: int):
        bind_replica_grpc_to_node()
        self.gallery = Gallery.open(path, progress=False)
        self.shard, self.shards = shard, shards

    def search(self, queries: np.ndarray, k: int, per_image: bool, tags: dict | None) -> list[list[dict]]:
        hits = self.gallery.search(queries, k, per_image, tags)
        return [[asdict(global_hit(h, self.shard, self.shards)) for h in per_q] for per_q in hits]


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Front:
    def __init__(
        self,
        bundle: str,
        root: str,
        galleries: dict,
        deadline_s: float = 5.0,
        retries: int = 2,
        threads: int = 1,
        encoder: str | None = None,
    ):
        """encoder: a Triton URL (grpc://HOST:8001) whose `encode_query` encodes the text,
        instead of ONNX Runtime in this replica (docs/cluster.md, "How Triton fits")."""
        bind_replica_grpc_to_node()
        if encoder:
            from reir.engine.triton_client import TritonRetriever  # tritonclient: the triton extra

            self.encode = TritonRetriever(encoder).encode
        else:
            self.encode = Engine(Bundle.open(bundle), threads=threads, visual=False).encode
        self.root = Path(root).resolve()
        self.galleries = galleries  # name -> list of shard handles, in shard order
        self.deadline_s, self.retries = deadline_s, retries

    async def __call__(self, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        try:
            return JSONResponse(await self.search(body))
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    async def search(self, body) -> dict:
        texts, k, per_image, tags, name = parse_request(body, self.root, self.galleries)
        queries, truncated = self.encode(texts)
        shards = self.galleries[name]
        deadline = time.monotonic() + self.deadline_s
        answers = await asyncio.gather(*(self._ask(h, queries, k, per_image, tags, deadline) for h in shards))
        missing = [s for s, a in enumerate(answers) if a is None]
        results = []
        for qi in range(len(texts)):
            lists = [[hit_from_json(d) for d in a[qi]] for a in answers if a is not None]
            hits = merge_hits(lists, k)
            results.append({"hits": [asdict(h) for h in hits], "truncated": bool(truncated[qi])})
        return {"results": results, "partial": bool(missing), "missing_shards": missing}

    async def _ask(self, handle, queries, k, per_image, tags, deadline: float):
        """One shard's answer, retried on failure until the deadline; None when it has none."""
        for _ in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return await asyncio.wait_for(handle.search.remote(queries, k, per_image, tags), timeout=left)
            except (RayActorError, RayTaskError, asyncio.TimeoutError, RuntimeError):
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return None


def parse_request(body, root: Path, galleries: dict) -> tuple[list[str], int, bool, dict | None, str]:
    """The request's fields, checked; BadRequest names the field and the problem."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - {"text", "k", "per_image", "tags", "gallery"}
    if unknown:
        raise BadRequest(f"unknown field(s): {sorted(unknown)}")
    text = body.get("text")
    texts = text if isinstance(text, list) else [text]
    if not texts or len(texts) > MAX_TEXTS:
        raise BadRequest(f"text: send 1 to {MAX_TEXTS} expressions, got {len(texts)}")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise BadRequest("text: empty expression")
    k = body.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be an integer in [1, {MAX_K}], got {k!r}")
    per_image = body.get("per_image", True)
    if not isinstance(per_image, bool):
        raise BadRequest(f"per_image must be true or false, got {per_image!r}")
    tags = body.get("tags")
    if tags is not None and (
        not isinstance(tags, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in tags.items())
    ):
        raise BadRequest("tags must be an object of strings")
    name = body.get("gallery")
    if name is None:
        if len(galleries) != 1:
            raise BadRequest(f"gallery: name one of {sorted(galleries)}")
        name = next(iter(galleries))
    if not isinstance(name, str) or not name:
        raise BadRequest("gallery must be a non-empty string")
    if not (root / name).resolve().is_relative_to(root):
        raise BadRequest(f"gallery {name!r} is outside the gallery root")
    if name not in galleries:
        raise BadRequest(f"no gallery named {name!r} is served here (served: {sorted(galleries)})", status=404)
    return texts, k, per_image, tags or None, name


def build_app(
    bundle: str | Path,
    root: str | Path,
    galleries: list[str],
    replicas: int = 1,
    deadline_s: float = 5.0,
    encoder: str | None = None,
):
    """The Serve application: a Front and, per gallery, one ShardSearch deployment per shard.
    `galleries` are directory names under `root` (sharded or not); `encoder`: a Triton URL
    that encodes the text instead of the front's own ONNX Runtime session."""
    root = Path(root).resolve()
    handles = {}
    for name in galleries:
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"gallery {name!r} is outside the gallery root {root}")
        shards = read_manifest(path)["shards"] if is_sharded(path) else 1
        handles[name] = [
            ShardSearch.options(name=f"{name}-shard-{s}", num_replicas=replicas).bind(
                str(shard_dir(path, s) if is_sharded(path) else path), s, shards
            )
            for s in range(shards)
        ]
    return Front.bind(str(bundle), str(root), handles, deadline_s, encoder=encoder)


def start(
    app, port: int = 8000, host: str = "127.0.0.1", route: str = "/reir", name: str = "reir", every_node: bool = False
) -> str:
    """Run the app on the connected Ray cluster; the HTTP proxy binds `host` (loopback
    unless told otherwise). One proxy, on the head node, unless `every_node` (a real
    multi-host cluster behind a load balancer; nodes sharing one host cannot all bind the
    port). Returns the URL clients use."""
    where = "EveryNode" if every_node else "HeadOnly"
    serve.start(proxy_location=where, http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=route, blocking=False)
    return f"http://{host}:{port}{route}"
