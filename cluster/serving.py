"""Sharded search on Ray Serve: a front deployment encodes the expressions and fans out to
one deployment per shard (R replicas each), then merges the per-shard top-k exactly.

    POST /reir   a search request of the contract (reir.engine.serving.contract), JSON
    200          its response; 4xx {"error": {"code", "message"}}: the same message every path gives
    GET  /reir/healthz, /reir/docs (OpenAPI, from the contract's schema)

Requests that arrive together are answered together, by the same `Batcher` and
`SearchService` as in process (engine/serving/batching.py): what queued while the last
batch ran is encoded in one call, off the event loop, and each shard gets one call per
batch. (Serve's `@serve.batch` forms batches from a timer instead: with a short timer a
closed loop of 16 clients got batches of one, and a long one makes a lone request wait.)
The front admits a request only while the work ahead of it fits the batch policy's queue
bound; past it a request gets 503 with Retry-After at once. Shard
replicas follow their gallery's writer, so new and removed images are served within about
a second. GET /reir/metrics: Prometheus text (engine/serving/metrics.py).

The front is a FastAPI app behind Serve's ingress; the route takes the contract's typed
`SearchRequest`, built from the raw body by the contract's own parser, so a malformed or
wrong request gets the same 4xx and message here as in process or through Triton.

A shard that does not answer within the request's deadline (its replicas are all down or
stuck) after retries is left out and named: `partial: true`, `missing_shards: [2]`. A
caller never waits past the deadline (counted from its arrival, plus at most a 1 s grace
for the healthy shards) and never gets a silent gap. A replica that dies
mid-call is retried on another replica of the same shard, so losing one replica loses no
query. An exception raised by a shard's code is a bug, not a missing shard: it fails the
request (500) and is logged.

Shard replicas open their shard read-only; its vectors are memory-mapped, so replicas on
one node share the page cache. Everything listens on the node's address (127.0.0.1 on a
local cluster); see cluster/compat.py.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from reir.cluster.compat import keep_replica_listener_on_node
from reir.engine.gallery.follow import Follower
from reir.engine.gallery.gallery import Gallery, GalleryMeta, merge_hits
from reir.engine.gallery.records import Hit
from reir.engine.runtime.bundle import Bundle
from reir.engine.runtime.engine import Engine
from reir.engine.serving.batching import Batcher, BatchPolicy
from reir.engine.serving.contract import (
    MAX_BODY_BYTES,
    RequestError,
    SearchRequest,
    SearchResponse,
    Unavailable,
)
from reir.engine.serving.metrics import CONTENT_TYPE, shard_state
from reir.engine.serving.service import GalleryRoot, SearchService, gallery_refusal, not_found

log = logging.getLogger("reir.serve")
# a replica that is gone or busy: ask another one of the same shard
RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, BackPressureError)

FRONT_ONGOING = 1024
api = FastAPI(title="clare-reir search", description="The search contract over HTTP (docs/cluster.md).")
BODY = {"requestBody": {"content": {"application/json": {}}, "required": True}}


class RouteRoot:
    """POST /reir answers as POST /reir/ does, at once: FastAPI would redirect it (307), a
    round trip every client pays, and some clients do not follow a redirect of a POST."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            root = scope.get("root_path", "")
            if scope["path"] in ("", root):
                scope = dict(scope, path=root + "/", raw_path=(root + "/").encode())
        await self.app(scope, receive, send)


api.add_middleware(RouteRoot)


@api.exception_handler(RequestError)
async def _refused(_request: Request, e: RequestError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.http_status)


@api.exception_handler(Unavailable)
async def _overloaded(_request: Request, e: Unavailable) -> JSONResponse:
    """503 with Retry-After (whole seconds, as HTTP has it) and the exact figure in the body."""
    body = {"error": {"code": "unavailable", "message": str(e), "retry_after_s": round(e.retry_after, 4)}}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))})


async def _read_body(request: Request) -> SearchRequest:
    """The body, read up to the contract's size limit, parsed by the contract."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError("body", f"{int(declared):,} bytes; at most {MAX_BODY_BYTES:,}", http_status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError("body", f"more than {MAX_BODY_BYTES:,} bytes", http_status=413)
    return SearchRequest.from_json(bytes(body))


async def contract_body(request: Request) -> SearchRequest:
    """The request, or the contract's 4xx, counted as the front's `invalid` outcome (a body
    refused here never reaches the batcher, which counts the rest)."""
    try:
        return await _read_body(request)
    except RequestError:
        request.app.state.metrics.outcome("invalid")
        raise


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ShardSearch:
    """One shard of one gallery, read-only, following its writer (new and removed images
    are searched within about a second); answers in the gallery's global ids."""

    def __init__(self, path: str, shard: int):
        keep_replica_listener_on_node()
        self.gallery = Gallery.open(path, progress=False, shard=shard)
        self.follower = Follower(lambda: [(path, self.gallery)])

    def search(self, queries: np.ndarray, k: int, per_image: bool, tags: dict | None) -> list[list[Hit]]:
        return self.gallery.search(queries, k, per_image, tags)

    def state(self) -> dict:
        """What the gallery gauges show of this shard (metrics)."""
        return shard_state(self.gallery.shards[0])


class ShardFanOut(SearchService):
    """The search service over shard replicas: a group's queries go to every shard of its
    gallery in one call each, and the per-shard top-k are merged exactly. Runs on the
    `Batcher`'s worker thread (blocking handle calls, never on the event loop)."""

    GRACE_S = 1.0  # the least a shard is waited for (a healthy one answers in milliseconds)

    def __init__(self, encode, bundle: Bundle, root: str, default, galleries: dict, refused: dict, deadline_s, retries):
        super().__init__(encode, bundle.model_id, bundle.dim, root, default, follow_s=None)
        self.shards = {self.root.path(n): h for n, h in galleries.items()}
        self.names = {self.root.path(n): n for n in galleries}
        self.refused = {self.root.path(n): RequestError("gallery", why) for n, why in refused.items()}
        self.deadline_s, self.retries = deadline_s, retries
        self.grace_s = min(self.GRACE_S, deadline_s)
        self.down: set[tuple[Path, int]] = set()  # shards that missed their last wait (batcher thread only)

    def gallery(self, name: str | None) -> Path:
        path = self.root.path(name)
        if path in self.refused:
            raise self.refused[path]
        if path not in self.shards:
            raise not_found(self.root.name(name))
        return path

    def search_group(
        self, path: Path, queries: np.ndarray, request: SearchRequest, since: float
    ) -> tuple[list, tuple[int, ...]]:
        args = (queries, request.k, request.per_image, request.tags)
        with self.metrics.stage.labels("search").time():
            answers = self._ask(path, args, since)
        with self.metrics.stage.labels("merge").time():
            missing = tuple(s for s, a in enumerate(answers) if a is None)
            hits = [merge_hits([a[q] for a in answers if a is not None], request.k) for q in range(len(queries))]
        return hits, missing

    def _ask(self, path: Path, args: tuple, since: float) -> list:
        """Every shard's answer, each retried on another replica until its wait ends; None
        for a shard with none in time. The wait runs to the oldest request's deadline
        (`since` + deadline_s), so a group queued behind one that waited out a dead shard
        does not wait a second deadline; but every shard gets at least `grace_s`, so a late
        group still hears from the healthy shards. A shard that missed its last wait gets
        only `grace_s` until it answers again: while a shard is down, answers come back
        partial at the usual rate instead of one batch per deadline. Anything a shard's
        code raises propagates (a bug, not a gap)."""
        handles = self.shards[path]
        floor = time.monotonic() + self.grace_s
        until = [floor if (path, s) in self.down else max(since + self.deadline_s, floor) for s in range(len(handles))]
        calls = {s: h.search.remote(*args) for s, h in enumerate(handles)}
        tries, answers = dict.fromkeys(calls, 0), [None] * len(handles)
        while calls:
            s, call = next(iter(calls.items()))
            try:
                answers[s] = call.result(timeout_s=max(until[s] - time.monotonic(), 0.001))
                del calls[s]
                self.down.discard((path, s))
            except (*RETRYABLE, TimeoutError) as e:
                call.cancel()
                tries[s] += 1
                if tries[s] > self.retries or time.monotonic() >= until[s]:
                    del calls[s]
                    self.down.add((path, s))
                    continue
                log.warning("shard %d call failed (%s), retrying", s, type(e).__name__)
                time.sleep(min(0.05, max(0.0, until[s] - time.monotonic())))
                calls[s] = handles[s].search.remote(*args)
        return answers


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Front:
    def __init__(
        self,
        bundle: str,
        root: str,
        galleries: dict,
        refused: dict,
        default: str | None = None,
        deadline_s: float = 5.0,
        retries: int = 2,
        threads: int = 2,
        encoder: str | None = None,
        policy: BatchPolicy | None = None,
    ):
        """galleries: name under `root` -> shard handles in shard order; refused: name -> why
        it may not be searched with this bundle; default: the gallery of a request that names
        none (the only one, when one is served). encoder: a Triton URL (grpc://HOST:8001)
        whose `encode_query` encodes the text, instead of ONNX Runtime here. policy: the
        batch size and the queue bound past which requests get 503 (engine/serving/batching.py)."""
        keep_replica_listener_on_node()
        b = Bundle.open(bundle)
        if encoder:
            from reir.engine.serving.triton_client import TritonRetriever  # tritonclient: the triton extra

            encode = TritonRetriever(encoder).encode
        else:
            encode = Engine(b, threads=threads).encode
        names = [*galleries, *refused]
        default = default or (names[0] if len(names) == 1 else None)
        self.service = ShardFanOut(encode, b, root, default, galleries, refused, deadline_s, retries)
        self.batcher = Batcher(self.service, policy)
        api.state.metrics = self.service.metrics

    @api.post("/", openapi_extra=BODY)
    async def search(self, request: SearchRequest = Depends(contract_body)) -> JSONResponse:  # noqa: B008
        return JSONResponse((await self.answer(request)).to_json())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "galleries": sorted(p.name for p in self.service.shards)}

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus text: this front's requests, stages, batches and queue; each shard's
        generation, rows and agreement as one of its replicas reports them."""
        for path, shards in self.service.shards.items():
            states = await asyncio.gather(*(h.state.remote() for h in shards), return_exceptions=True)
            for st in states:
                if isinstance(st, dict):
                    self.service.metrics.shard(self.service.names[path], st)
        return Response(self.service.metrics.render(), media_type=CONTENT_TYPE)

    async def answer(self, request: SearchRequest) -> SearchResponse:
        """Admitted when the work ahead fits the policy's queue bound (else Unavailable: 503),
        then answered by the batcher with the requests that queued while it was busy."""
        return await asyncio.wrap_future(self.batcher.submit(request))


def build_app(
    bundle: str | Path,
    root: str | Path,
    galleries: list[str],
    replicas: int = 1,
    deadline_s: float = 5.0,
    encoder: str | None = None,
    default: str | None = None,
    policy: BatchPolicy | None = None,
    threads: int = 2,
):
    """The Serve application: a Front and, per gallery, one ShardSearch deployment per
    shard. `galleries` are directory names under `root`; one indexed with another model
    than `bundle` is not deployed, and requests for it get the contract's refusal.
    `default`: the gallery of requests that name none; `policy`: batch size and queue bound."""
    b = Bundle.open(bundle)
    names = GalleryRoot(root)
    if default is not None and default not in galleries:
        raise ValueError(f"the default gallery {default!r} is not among the served ones {galleries}")
    handles, refused = {}, {}
    for name in galleries:
        path = names.path(name)  # RequestError for a name outside the root: a ValueError to the caller
        meta = GalleryMeta.read(path)
        why = gallery_refusal(name, meta, b.model_id, b.dim)
        if why is not None:
            log.warning("%s: not served (%s)", path, why)
            refused[name] = why.problem
            continue
        handles[name] = [
            ShardSearch.options(name=f"{name}-shard-{s}", num_replicas=replicas).bind(str(path), s)
            for s in range(meta.shards)
        ]
    # Serve's own limit stays far above the policy's bound, so that the front's admission,
    # not a queue in Serve's router, decides who waits (and who gets a fast 503)
    front = Front.options(max_ongoing_requests=FRONT_ONGOING)
    return front.bind(
        str(b.path),
        str(names.root),
        handles,
        refused,
        default,
        deadline_s,
        threads=threads,
        encoder=encoder,
        policy=policy,
    )


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
