"""`ServeRetriever`: the search contract against the Ray Serve app (`reir cluster serve`).

    remote = ServeRetriever("http://127.0.0.1:8000/reir")
    response = remote.search("the small red circle left of the blue star", k=10)
    response.hits, response.partial, response.missing_shards      # shards that did not answer

The request and the answer are the contract's JSON documents over HTTP. Standard library
only (the engine install needs nothing more); one keep-alive connection per thread, so a
client is safe to share between threads. `AsyncServeRetriever` is the asyncio twin.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import urllib.parse

from reir.engine.serving.contract import (
    INVALID,
    NOT_FOUND,
    AsyncClient,
    Client,
    RequestError,
    SearchRequest,
    SearchResponse,
    ServiceError,
    Unavailable,
)

CODE_OF_STATUS = {400: INVALID, 404: NOT_FOUND, 413: INVALID, 422: INVALID}


class ServeRetriever(Client):
    def __init__(self, url: str, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServiceError(f"{url}: the Serve app's URL is http(s)://HOST:PORT/ROUTE")
        self.url, self.timeout = url.rstrip("/"), timeout
        self._parts = parts
        self._local = threading.local()

    def answer(self, request: SearchRequest) -> SearchResponse:
        return self.answer_json(json.dumps(request.to_json()))

    def answer_json(self, body: bytes | str) -> SearchResponse:
        status, headers, data = self.post(body)
        if status == 200:
            try:
                return SearchResponse.from_json(json.loads(data))
            except ValueError as e:
                raise ServiceError(f"{self.url}: the answer is not JSON ({e})") from None
        raise _error(self.url, status, headers, data)

    def post(self, body: bytes | str) -> tuple[int, dict[str, str], bytes]:
        """POST `body` as it is; (status, headers, body) of the reply. One retry on a
        keep-alive connection the server closed in the meantime."""
        data = body.encode("utf-8") if isinstance(body, str) else body
        for attempt in range(2):
            conn = self._connection()
            try:
                conn.request("POST", self._parts.path or "/", data, {"Content-Type": "application/json"})
                reply = conn.getresponse()
                return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self._drop()
                if attempt:
                    raise ServiceError(f"{self.url}: the connection was closed ({e})") from None
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                why = "timed out" if isinstance(e, socket.timeout | TimeoutError) else f"cannot reach the app ({e})"
                raise Unavailable(f"{self.url}: {why}") from None
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = cls(self._parts.hostname, self._parts.port, timeout=self.timeout)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        self._drop()


def _error(url: str, status: int, headers: dict[str, str], data: bytes) -> Exception:
    retry_after = None
    try:
        err = json.loads(data)["error"]
        message, code = str(err["message"]), str(err.get("code", CODE_OF_STATUS.get(status, INVALID)))
        retry_after = err.get("retry_after_s")  # the server's exact figure; the header has whole seconds
    except (ValueError, KeyError, TypeError):
        message, code = data.decode("utf-8", "replace")[:500] or f"HTTP {status}", CODE_OF_STATUS.get(status, INVALID)
    if status in CODE_OF_STATUS:
        return RequestError.from_message(message, code)
    if status == 503:
        if not isinstance(retry_after, int | float) or retry_after <= 0:
            retry_after = float(headers.get("retry-after", 1) or 1)
        return Unavailable(f"{url}: HTTP 503: {message}", float(retry_after))
    return ServiceError(f"{url}: HTTP {status}: {message}")


class AsyncServeRetriever(AsyncClient):
    """Each call runs on a worker thread with its own keep-alive connection, so many
    requests are in flight at once without blocking the event loop."""

    def __init__(self, url: str, timeout: float = 30.0):
        self._sync = ServeRetriever(url, timeout)
        self.url = self._sync.url

    async def answer(self, request: SearchRequest) -> SearchResponse:
        return await asyncio.to_thread(self._sync.answer, request)

    async def answer_json(self, body: bytes | str) -> SearchResponse:
        return await asyncio.to_thread(self._sync.answer_json, body)
