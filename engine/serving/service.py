"""`SearchService`: the contract answered in process for galleries named under one root.

What a server runs: Triton's `retrieve` model is this service with Triton's `encode_query`
as its encoder; `SearchService.embedded(engine, root)` is the same in a Python process.
The Ray Serve app's front is this service too, with its `gallery()` and `search_group()` fanning
a group out to shard replicas (cluster/serving.py), so every path plans, encodes, refuses
and answers a batch with the same code and gives the same error for the same request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reir.engine.gallery.follow import EVERY_S, Follower
from reir.engine.gallery.gallery import Gallery, GalleryMeta, exists
from reir.engine.serving.contract import (
    NOT_FOUND,
    Client,
    QueryResult,
    RequestError,
    SearchRequest,
    SearchResponse,
    Unavailable,
)
from reir.engine.serving.metrics import Metrics

Encoder = Callable[[list[str]], tuple[np.ndarray, list[bool]]]


class GalleryRoot:
    """Gallery names as requests give them, resolved under one directory and never outside it."""

    def __init__(self, root: str | Path, default: str | None = None):
        self.root = Path(root).resolve()
        self.default = default or None

    def path(self, name: str | None) -> Path:
        name = name if name is not None else self.default
        if name is None:
            raise RequestError("gallery", "name the gallery to search (this server has no default)")
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise RequestError("gallery", f"{name!r} is outside the gallery root")
        return path

    def name(self, requested: str | None) -> str:
        return requested if requested is not None else str(self.default)


def gallery_refusal(name: str, meta: GalleryMeta, model_id: str, dim: int) -> RequestError | None:
    """Why a server with this model must not search this gallery (None: it may)."""
    if (meta.model and meta.model != model_id) or meta.dim != dim:
        return RequestError(
            "gallery",
            f"{name!r} was indexed with another model ({meta.model[:12] or 'unnamed'}, {meta.dim}-d); "
            f"this server's bundle is {model_id[:12]} ({dim}-d), so its vectors would not be comparable",
        )
    return None


def not_found(name: str) -> RequestError:
    return RequestError("gallery", f"no gallery named {name!r} is served here", NOT_FOUND)


@dataclass
class Plan:
    """Requests that arrived together, as one batch: each text once, and the requests that
    ask one gallery the same way (k, per_image, tags) in groups searched with one call."""

    texts: list[str]
    row: dict[str, int]  # text -> its row in the encoded matrix
    groups: list[list[int]]  # request indices
    target: dict[int, Hashable]  # request index -> what it searches
    refused: dict[int, RequestError]  # request index -> why it may not be searched

    @classmethod
    def of(cls, requests: list[SearchRequest], resolve: Callable[[str | None], Hashable]) -> Plan:
        """`resolve(gallery name)`: what a request searches, or the RequestError that refuses it."""
        target, refused = {}, {}
        for i, r in enumerate(requests):
            try:
                target[i] = resolve(r.gallery)
            except RequestError as e:
                refused[i] = e
        todo = sorted(target)
        texts = sorted({t for i in todo for t in requests[i].texts})
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            r = requests[i]
            key = (target[i], r.k, r.per_image, tuple(sorted((r.tags or {}).items())))
            groups.setdefault(key, []).append(i)
        return cls(texts, {t: j for j, t in enumerate(texts)}, list(groups.values()), target, refused)

    def rows(self, requests: list[SearchRequest], members: list[int]) -> list[int]:
        """The encoded rows of a group's texts, request by request."""
        return [self.row[t] for i in members for t in requests[i].texts]

    def split(
        self, requests: list[SearchRequest], members: list[int], hits: list, cut: list[bool], missing=()
    ) -> dict[int, SearchResponse]:
        """A group's hits (one list per text, in `rows` order) back into each request's answer."""
        out, at = {}, 0
        for i in members:
            texts = requests[i].texts
            mine = zip(hits[at : at + len(texts)], texts, strict=True)
            results = tuple(QueryResult(tuple(h), bool(cut[self.row[t]])) for h, t in mine)
            out[i], at = SearchResponse(results, bool(missing), tuple(missing)), at + len(texts)
        return out


class SearchService(Client):
    def __init__(
        self,
        encode: Encoder,
        model_id: str,
        dim: int,
        root: str | Path,
        default_gallery: str | None = None,
        follow_s: float | None = EVERY_S,
        families=None,
    ):
        """`encode(texts) -> (query vectors, truncated flags)`: the engine's, or a server's.
        `follow_s`: how often the open galleries catch up with their writers (None: never).
        `families`: where the metrics live (engine/serving/metrics.py; None: its own registry)."""
        self.encode, self.model_id, self.dim = encode, model_id, dim
        self.root = GalleryRoot(root, default_gallery)
        self.metrics = Metrics(before_render=self.update_gauges, families=families)
        self._open: dict[Path, tuple[str, Gallery]] = {}
        self._lock = threading.Lock()
        self._follower = Follower(self._following, follow_s) if follow_s else None

    @classmethod
    def embedded(
        cls, engine, root: str | Path, default_gallery: str | None = None, follow_s: float | None = EVERY_S
    ) -> SearchService:
        """The service on an `Engine` in this process."""
        return cls(engine.encode, engine.model_id, engine.dim, root, default_gallery, follow_s)

    def gallery(self, name: str | None) -> Gallery:
        """The named gallery, opened read-only on first use; RequestError if it may not be searched."""
        path = self.root.path(name)
        with self._lock:
            if path not in self._open:
                shown = self.root.name(name)
                if not exists(path):
                    raise not_found(shown)
                refusal = gallery_refusal(shown, GalleryMeta.read(path), self.model_id, self.dim)
                if refusal is not None:
                    raise refusal
                g = Gallery.open(path, progress=False)
                self._open[path] = (shown, g)
            return self._open[path][1]

    def _following(self) -> list[tuple[str, Gallery]]:
        with self._lock:
            return list(self._open.values())

    def update_gauges(self) -> None:
        """Each open gallery's generation, rows and agreement into the gauges."""
        for name, g in self._following():
            self.metrics.gallery(name, g)

    def answer(self, request: SearchRequest) -> SearchResponse:
        result = self.answer_batch([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def answer_batch(
        self, requests: list[SearchRequest], since: float | None = None
    ) -> list[SearchResponse | RequestError]:
        """Requests that arrived together: every text encoded in one call, and the requests
        that ask the same gallery the same way searched together. Each gets its answer, or
        the RequestError that refuses it (one bad request does not fail the others).
        `since`: when the oldest of them arrived (time.monotonic(); None: now), so that a
        deadline counts the time a request queued, not only its batch's."""
        since = time.monotonic() if since is None else since
        plan = Plan.of(requests, self.gallery)
        out: dict[int, SearchResponse | RequestError] = dict(plan.refused)
        if plan.texts:
            with self.metrics.stage.labels("encode").time():
                vectors, cut = self.encode(plan.texts)
        for members in plan.groups:
            r, queries = requests[members[0]], vectors[plan.rows(requests, members)]
            hits, missing = self.search_group(plan.target[members[0]], queries, r, since)
            out.update(plan.split(requests, members, hits, cut, missing))
        for a in out.values():
            self.metrics.outcome(outcome_of(a))
        return [out[i] for i in range(len(requests))]

    def search_group(
        self, gallery, queries: np.ndarray, request: SearchRequest, since: float
    ) -> tuple[list, tuple[int, ...]]:
        """One group's search (`gallery`: what `gallery()` resolved): each query's hits, and
        the shards that did not answer (none in process, where nothing waits on a deadline;
        a fan-out over replicas overrides this)."""
        with self.metrics.stage.labels("search").time():
            return gallery.search(queries, request.k, request.per_image, request.tags), ()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()
        with self._lock:
            for _, g in self._open.values():
                g.close()
            self._open.clear()


def outcome_of(answer: SearchResponse | Exception) -> str:
    """The metrics' name for how a request ended."""
    if isinstance(answer, SearchResponse):
        return "partial" if answer.partial else "ok"
    if isinstance(answer, RequestError):
        return "not_found" if answer.code == NOT_FOUND else "invalid"
    return "refused" if isinstance(answer, Unavailable) else "error"
