"""`TritonRetriever`: the search contract against Triton's `retrieve` model.

    r = TritonRetriever("grpc://127.0.0.1:8001")                  # or http://127.0.0.1:8000
    hits = r.search("the small red circle left of the blue star", k=10, tags={"camera": "front"}).hits

The request travels as its JSON document in the `REQUEST` string tensor and the answer
comes back in `RESPONSE` (triton_models/README.md), so the server checks it with the same
code and the same messages as every other path. Health checks, a per-request timeout and
bounded retries (connection errors and UNAVAILABLE only: a bad request is not retried).
`AsyncTritonRetriever` is the asyncio twin.
"""

from __future__ import annotations

import json
import time

import numpy as np

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


def split_url(url: str) -> tuple[str, str]:
    """(host:port, protocol) of a grpc:// or http:// URL (a bare host:port is gRPC)."""
    for scheme in ("grpc", "http"):
        if url.startswith(f"{scheme}://"):
            return url[len(scheme) + 3 :].rstrip("/"), scheme
    if "://" in url:
        raise ServiceError(f"{url}: a Triton URL is grpc://HOST:PORT or http://HOST:PORT")
    return url, "grpc"


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        import tritonclient.grpc as m  # tritonclient: the triton extra, only for remote search
        import tritonclient.grpc.aio as a
    else:
        import tritonclient.http as m
        import tritonclient.http.aio as a
    return a if aio else m


def _request_inputs(mod, body: bytes | str):
    data = body.encode("utf-8") if isinstance(body, str) else body
    t = mod.InferInput("REQUEST", [1, 1], "BYTES")
    t.set_data_from_numpy(np.array([[data]], dtype=object))
    return [t], [mod.InferRequestedOutput("RESPONSE")]


def _response(result) -> SearchResponse:
    raw = result.as_numpy("RESPONSE").reshape(-1)[0]
    try:
        return SearchResponse.from_json(json.loads(raw))
    except ValueError as e:
        raise ServiceError(f"retrieve sent a response that is not JSON ({e})") from None


def _message(e: Exception) -> str:
    msg = getattr(e, "message", None)
    return (msg() if callable(msg) else msg) or str(e)


def _status(e: Exception) -> str:
    status = getattr(e, "status", None)
    return str(status() if callable(status) else status or "")


QUEUE_FULL_RETRY_S = 0.1


def translate(e: Exception, where: str) -> Exception:
    """tritonclient's exception as the contract's: the request's fault (RequestError, with
    the server's message as every path words it), overload (Unavailable), or the service's."""
    status, message = _status(e), _message(e)
    if status in ("StatusCode.INVALID_ARGUMENT", "400"):
        return RequestError.from_message(message, INVALID)
    if status in ("StatusCode.NOT_FOUND", "404") and message.startswith("gallery: "):  # ours, not Triton's
        return RequestError.from_message(message, NOT_FOUND)
    if status in ("StatusCode.UNAVAILABLE", "503") or _unreachable(message):
        # Triton sends no Retry-After: a full queue drains in about one batch, a down server does not
        return Unavailable(f"{where}: {message}", QUEUE_FULL_RETRY_S if "queue" in message.lower() else 1.0)
    return ServiceError(f"{where}: {message}")


def _unreachable(text: str) -> bool:
    text = text.lower()
    return any(s in text for s in ("unavailable", "connection refused", "failed to connect", "connection reset"))


class TritonRetriever(Client):
    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 2, model: str = "retrieve"):
        self.url, self.protocol = split_url(url)
        self.mod = _module(self.protocol)
        self.client = self.mod.InferenceServerClient(self.url)
        self.timeout_s, self.retries, self.model = timeout_s, retries, model

    def is_server_ready(self) -> bool:
        try:
            return bool(self.client.is_server_ready())
        except Exception:
            return False

    def is_model_ready(self, name: str | None = None) -> bool:
        try:
            return bool(self.client.is_model_ready(name or self.model))
        except Exception:
            return False

    def answer(self, request: SearchRequest) -> SearchResponse:
        return self.answer_json(json.dumps(request.to_json()))

    def answer_json(self, body: bytes | str) -> SearchResponse:
        inputs, outputs = _request_inputs(self.mod, body)
        return _response(self._infer(self.model, inputs, outputs))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Query vectors [N, D] and truncation flags from the server's `encode_query`
        ensemble: what a search front end (the Ray Serve app's `--encoder`) calls instead
        of running the text encoder itself, when Triton serves the models on GPU hosts."""
        texts = list(SearchRequest.of(texts).texts)
        arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        text = self.mod.InferInput("TEXT", list(arr.shape), "BYTES")
        text.set_data_from_numpy(arr)
        outputs = [self.mod.InferRequestedOutput(n) for n in ("query", "truncated")]
        res = self._infer("encode_query", [text], outputs)
        return res.as_numpy("query").astype(np.float32), [bool(t) for t in res.as_numpy("truncated").reshape(-1)]

    def _infer(self, model: str, inputs: list, outputs: list):
        """One request, retried with backoff while the service is unavailable."""
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        for attempt in range(self.retries + 1):
            try:
                return self.client.infer(model, inputs, outputs=outputs, **kwargs)
            except Exception as e:
                err = translate(e, f"{self.protocol}://{self.url} {model}")
                if attempt == self.retries or not isinstance(err, Unavailable):
                    raise err from None
                time.sleep(0.1 * 2**attempt)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTritonRetriever(AsyncClient):
    """`await r.search(...)`; many searches in flight on one client."""

    def __init__(self, url: str, timeout_s: float = 10.0, model: str = "retrieve"):
        self.url, self.protocol = split_url(url)
        self.mod = _module(self.protocol, aio=True)
        self.client = self.mod.InferenceServerClient(self.url)
        self.timeout_s, self.model = timeout_s, model

    async def answer(self, request: SearchRequest) -> SearchResponse:
        return await self.answer_json(json.dumps(request.to_json()))

    async def answer_json(self, body: bytes | str) -> SearchResponse:
        inputs, outputs = _request_inputs(self.mod, body)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            res = await self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except Exception as e:
            raise translate(e, f"{self.protocol}://{self.url} {self.model}") from None
        return _response(res)

    async def close(self) -> None:
        await self.client.close()
