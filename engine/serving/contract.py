"""The search contract: one request type, one validation, one response type, one JSON form.

Every way to ask for a search speaks it: the embedded `Retriever` and `SearchService`,
Triton's `retrieve` model (a JSON document in a string tensor) and `TritonRetriever`, the
Ray Serve app (the same JSON over HTTP) and `ServeRetriever`. A transport only moves the
JSON; the checks, their messages and the meaning of every field live here, so the same
wrong request gets the same `RequestError` with the same message on every path.

    request   {"text": "the red circle" | ["...", ...], "k": 10, "per_image": true,
               "tags": {"camera": "front"} | null, "gallery": "main" | null}
    response  {"results": [{"hits": [{"image_id", "path", "box", "score", "instance_key",
               "detection_score"}, ...], "truncated": false}, ...],
               "partial": false, "missing_shards": []}
    error     {"error": {"code": "invalid_argument", "message": "k: must be an integer in [1, 100], got 0"}}

`partial` is true when some shards of a sharded gallery did not answer in time; they are
named in `missing_shards`, and the hits are the exact top-k of the shards that did.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from reir.engine.errors import ReirError
from reir.engine.gallery.records import Hit

MAX_TEXTS = 64  # expressions per request
MAX_TEXT_CHARS = 1000  # far past the model's max length: longer text is truncated anyway
MAX_K = 100
MAX_TAGS = 16
MAX_BODY_BYTES = 256 * 1024
FIELDS = ("text", "k", "per_image", "tags", "gallery")

# error codes: gRPC's names, which every transport can carry (HTTP 400 / 404)
INVALID = "invalid_argument"
NOT_FOUND = "not_found"
HTTP_STATUS = {INVALID: 400, NOT_FOUND: 404}


class RequestError(ReirError, ValueError):
    """The request is wrong: the client's to fix, never retried. `field` names the part.
    `http_status`: what HTTP answers (413 for a body over the limit; else from the code)."""

    def __init__(self, field: str, problem: str, code: str = INVALID, http_status: int | None = None):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem, self.code = field, problem, code
        self.http_status = http_status or HTTP_STATUS[code]

    @classmethod
    def from_message(cls, message: str, code: str = INVALID) -> RequestError:
        """The error a server sent back as `field: problem` text (Triton carries only text)."""
        name, sep, problem = message.partition(": ")
        return cls(name, problem, code) if sep else cls("request", message, code)

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": str(self)}}


class ServiceError(ReirError):
    """The service could not answer: unreachable, timed out, or failed on its side."""


class Unavailable(ServiceError):
    """The service is overloaded or starting: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class SearchRequest:
    texts: tuple[str, ...]
    k: int = 10
    per_image: bool = True
    tags: Mapping[str, str] | None = None
    gallery: str | None = None

    @classmethod
    def of(
        cls,
        text: str | Sequence[str],
        k: int = 10,
        per_image: bool = True,
        tags: Mapping[str, str] | None = None,
        gallery: str | None = None,
    ) -> SearchRequest:
        """A request from Python arguments, checked exactly as a JSON one is."""
        return cls.parse({"text": text, "k": k, "per_image": per_image, "tags": tags, "gallery": gallery})

    @classmethod
    def from_json(cls, data: bytes | str) -> SearchRequest:
        """A request from its JSON text (an HTTP body, a Triton string tensor)."""
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        if size > MAX_BODY_BYTES:
            raise RequestError("body", f"{size:,} bytes; at most {MAX_BODY_BYTES:,}", http_status=413)
        try:
            body = json.loads(data)
        except RecursionError:
            raise RequestError("body", "JSON nested too deeply") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError("body", f"not valid JSON ({e})") from None
        return cls.parse(body)

    @classmethod
    def parse(cls, body: Any) -> SearchRequest:
        """A request from a decoded JSON object; RequestError names the first wrong field."""
        if not isinstance(body, Mapping):
            raise RequestError("body", f"must be a JSON object, got {_kind(body)}")
        unknown = sorted(str(key) for key in body if key not in FIELDS)
        if unknown:
            raise RequestError("body", f"unknown field(s) {unknown}; the fields are {list(FIELDS)}")
        return cls(
            _texts(body.get("text")),
            _k(body.get("k", 10)),
            _flag("per_image", body.get("per_image", True)),
            _tags(body.get("tags")),
            _gallery(body.get("gallery")),
        )

    def to_json(self) -> dict:
        out: dict[str, Any] = {"text": list(self.texts), "k": self.k, "per_image": self.per_image}
        if self.tags:
            out["tags"] = dict(self.tags)
        if self.gallery is not None:
            out["gallery"] = self.gallery
        return out


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, numbers.Number) else type(value).__name__
    )


def _texts(value: Any) -> tuple[str, ...]:
    if value is None:
        raise RequestError("text", "missing: send an expression or a list of 1 to 64")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list | tuple):
        raise RequestError("text", f"must be a string or a list of strings, got {_kind(value)}")
    if not 1 <= len(texts) <= MAX_TEXTS:
        raise RequestError("text", f"send 1 to {MAX_TEXTS} expressions, got {len(texts)}")
    for i, t in enumerate(texts):
        where = "text" if isinstance(value, str) else f"text[{i}]"
        if not isinstance(t, str):
            raise RequestError(where, f"must be a string, got {_kind(t)}")
        if not t.strip():
            raise RequestError(where, "empty expression")
        if len(t) > MAX_TEXT_CHARS:
            raise RequestError(where, f"{len(t):,} characters; at most {MAX_TEXT_CHARS:,}")
    return tuple(texts)


def _k(value: Any) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        shown = repr(value) if isinstance(value, numbers.Number | str) else _kind(value)
        raise RequestError("k", f"must be an integer in [1, {MAX_K}], got {shown}")
    return int(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {_kind(value)}")
    return value


def _tags(value: Any) -> Mapping[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise RequestError("tags", f"must be an object of strings, got {_kind(value)}")
    if len(value) > MAX_TAGS:
        raise RequestError("tags", f"{len(value)} tags; at most {MAX_TAGS}")
    for key, v in value.items():
        if not isinstance(key, str) or not key or not isinstance(v, str):
            raise RequestError("tags", f"must be an object of strings, got {key!r}: {_kind(v)}")
    return dict(value) or None


def _gallery(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RequestError("gallery", f"must be a non-empty string, got {_kind(value)}")
    return value


@dataclass(frozen=True)
class QueryResult:
    """One expression's answer: the exact top-k, best first."""

    hits: tuple[Hit, ...]
    truncated: bool = False  # the expression was cut at the model's max length


@dataclass(frozen=True)
class SearchResponse:
    results: tuple[QueryResult, ...]
    partial: bool = False
    missing_shards: tuple[int, ...] = field(default=())

    @property
    def hits(self) -> tuple[Hit, ...]:
        """The hits of a one-expression request."""
        if len(self.results) != 1:
            raise ValueError(f"this response answers {len(self.results)} expressions; read .results")
        return self.results[0].hits

    def to_json(self) -> dict:
        return {
            "results": [{"hits": [_hit_json(h) for h in r.hits], "truncated": r.truncated} for r in self.results],
            "partial": self.partial,
            "missing_shards": list(self.missing_shards),
        }

    @classmethod
    def from_json(cls, body: Mapping) -> SearchResponse:
        try:
            results = tuple(
                QueryResult(tuple(_hit(h) for h in r["hits"]), bool(r["truncated"])) for r in body["results"]
            )
            return cls(results, bool(body["partial"]), tuple(int(s) for s in body["missing_shards"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ServiceError(f"the service sent a response this client cannot read ({e!r})") from None


def _hit_json(h: Hit) -> dict:
    return {
        "image_id": h.image_id,
        "path": h.path,
        "box": list(h.box),
        "score": h.score,
        "instance_key": h.instance_key,
        "detection_score": h.detection_score,
    }


def _hit(d: Mapping) -> Hit:
    box = tuple(float(v) for v in d["box"])
    return Hit(
        int(d["image_id"]), str(d["path"]), box, float(d["score"]), int(d["instance_key"]), float(d["detection_score"])
    )


class Client:
    """What every way to search offers: `search(...)` with arguments, `answer(request)`."""

    def search(
        self,
        text: str | Sequence[str],
        k: int = 10,
        per_image: bool = True,
        tags: Mapping[str, str] | None = None,
        gallery: str | None = None,
    ) -> SearchResponse:
        """The exact top-k images (best instance each, or instances with per_image=False)
        for each expression; `tags`: only images carrying all of them; `gallery`: a name
        under the server's gallery root (servers only)."""
        return self.answer(SearchRequest.of(text, k, per_image, tags, gallery))

    def answer(self, request: SearchRequest) -> SearchResponse:
        raise NotImplementedError

    def answer_json(self, body: bytes | str) -> SearchResponse:
        """A request in its JSON form, checked where it is answered (a remote client sends
        it as it is): what a proxy or a load generator holding JSON already calls."""
        return self.answer(SearchRequest.from_json(body))


class AsyncClient:
    """The asyncio twin of `Client`: many searches in flight on one client."""

    async def search(
        self,
        text: str | Sequence[str],
        k: int = 10,
        per_image: bool = True,
        tags: Mapping[str, str] | None = None,
        gallery: str | None = None,
    ) -> SearchResponse:
        return await self.answer(SearchRequest.of(text, k, per_image, tags, gallery))

    async def answer(self, request: SearchRequest) -> SearchResponse:
        raise NotImplementedError

    async def answer_json(self, body: bytes | str) -> SearchResponse:
        return await self.answer(SearchRequest.from_json(body))
