"""`SearchService`: the contract answered in process for galleries named under one root.

What a server runs: Triton's `retrieve` model is this service with Triton's `encode_query`
as its encoder; `SearchService.embedded(engine, root)` is the same in a Python process.
The Ray Serve app fans a request out to shard replicas instead, but names, checks and
refuses galleries with the same `GalleryRoot` and `gallery_refusal`, so every path gives
the same answer and the same error for the same request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from reir.engine.gallery.gallery import Gallery, GalleryMeta, exists
from reir.engine.serving.contract import NOT_FOUND, Client, QueryResult, RequestError, SearchRequest, SearchResponse

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


class SearchService(Client):
    def __init__(self, encode: Encoder, model_id: str, dim: int, root: str | Path, default_gallery: str | None = None):
        """`encode(texts) -> (query vectors, truncated flags)`: the engine's, or a server's."""
        self.encode, self.model_id, self.dim = encode, model_id, dim
        self.root = GalleryRoot(root, default_gallery)
        self._open: dict[Path, Gallery] = {}
        self._lock = threading.Lock()

    @classmethod
    def embedded(cls, engine, root: str | Path, default_gallery: str | None = None) -> SearchService:
        """The service on an `Engine` in this process."""
        return cls(engine.encode, engine.model_id, engine.dim, root, default_gallery)

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
                self._open[path] = Gallery.open(path, progress=False)
            return self._open[path]

    def answer(self, request: SearchRequest) -> SearchResponse:
        result = self.answer_batch([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def answer_batch(self, requests: list[SearchRequest]) -> list[SearchResponse | RequestError]:
        """Requests that arrived together: every text encoded in one call, and the requests
        that ask the same gallery the same way searched together. Each gets its answer, or
        the RequestError that refuses it (one bad request does not fail the others)."""
        out: list[SearchResponse | RequestError | None] = [None] * len(requests)
        galleries = {}
        for i, r in enumerate(requests):
            try:
                galleries[i] = self.gallery(r.gallery)
            except RequestError as e:
                out[i] = e
        todo = sorted(galleries)
        texts = sorted({t for i in todo for t in requests[i].texts})
        if texts:
            vectors, cut = self.encode(texts)
            row = {t: j for j, t in enumerate(texts)}
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            r = requests[i]
            key = (id(galleries[i]), r.k, r.per_image, tuple(sorted((r.tags or {}).items())))
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            first = requests[members[0]]
            rows = [row[t] for i in members for t in requests[i].texts]
            hits = galleries[members[0]].search(vectors[rows], first.k, first.per_image, first.tags)
            at = 0
            for i in members:
                n = len(requests[i].texts)
                results = tuple(
                    QueryResult(tuple(h), bool(cut[row[t]]))
                    for h, t in zip(hits[at : at + n], requests[i].texts, strict=True)
                )
                out[i], at = SearchResponse(results), at + n
        return out

    def close(self) -> None:
        with self._lock:
            for g in self._open.values():
                g.close()
            self._open.clear()
