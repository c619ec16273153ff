"""Clients of the Ray Serve search app (reir cluster serve), with `Retriever.search`'s
signature and hit type, so code moves from an embedded gallery to a cluster by changing
one constructor.

    remote = ServeRetriever("ray://127.0.0.1:8000/reir")      # or http://127.0.0.1:8000/reir
    hits = remote.search("the small red circle left of the blue star", k=10)
    remote.last_partial, remote.last_missing                    # shards that did not answer

`ray://HOST:PORT/ROUTE` names the app's HTTP endpoint (Serve speaks plain HTTP); it is
not Ray's client protocol. Standard library only: the engine install needs nothing more.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from .records import Hit


class ServeError(RuntimeError):
    """The app refused the request (the message says why) or could not be reached."""


def http_url(url: str) -> str:
    if url.startswith("ray://"):
        url = "http://" + url[len("ray://") :]
    if not url.startswith(("http://", "https://")):
        raise ServeError(f"{url}: expected ray://HOST:PORT/ROUTE or http(s)://HOST:PORT/ROUTE")
    return url.rstrip("/")


def hit_from_json(d: dict) -> Hit:
    return Hit(
        int(d["image_id"]),
        d["path"],
        tuple(float(v) for v in d["box"]),
        float(d["score"]),
        int(d["instance_key"]),
        float(d["detection_score"]),
    )


class ServeRetriever:
    def __init__(self, url: str, gallery: str | None = None, timeout: float = 30.0):
        self.url, self.gallery, self.timeout = http_url(url), gallery, timeout
        self.last_truncated: list[bool] = []
        self.last_partial = False
        self.last_missing: list[int] = []

    def search(
        self, expression: str | list[str], k: int = 10, per_image: bool = True, tags: dict[str, str] | None = None
    ) -> list[Hit] | list[list[Hit]]:
        many = not isinstance(expression, str)
        body = {"text": list(expression) if many else expression, "k": k, "per_image": per_image, "tags": tags}
        if self.gallery is not None:
            body["gallery"] = self.gallery
        reply = self._post(body)
        results = reply["results"]
        self.last_truncated = [bool(r["truncated"]) for r in results]
        self.last_partial, self.last_missing = bool(reply["partial"]), list(reply["missing_shards"])
        hits = [[hit_from_json(h) for h in r["hits"]] for r in results]
        return hits if many else hits[0]

    def _post(self, body: dict) -> dict:
        req = urllib.request.Request(
            self.url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read()).get("error", e.reason)
            except ValueError:
                message = e.reason
            raise ServeError(f"{self.url}: HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise ServeError(f"{self.url}: cannot reach the search app ({getattr(e, 'reason', e)})") from None


class AsyncServeRetriever:
    """The same client for asyncio code: each call runs in a worker thread, so many
    requests can be in flight at once without blocking the event loop."""

    def __init__(self, url: str, gallery: str | None = None, timeout: float = 30.0):
        self.url, self.gallery, self.timeout = http_url(url), gallery, timeout

    async def search(
        self, expression: str | list[str], k: int = 10, per_image: bool = True, tags: dict[str, str] | None = None
    ) -> list[Hit] | list[list[Hit]]:
        client = ServeRetriever(self.url, self.gallery, self.timeout)  # one per call: no shared last_*
        return await asyncio.to_thread(client.search, expression, k, per_image, tags)
