"""`TritonRetriever`: the embedded `Retriever`'s `search()` against a Triton server.

    r = TritonRetriever("127.0.0.1:8001", protocol="grpc")
    hits = r.search("the small red circle left of the blue star", k=10)     # list[Hit]
    many = r.search(["a red circle", "the blue star"], k=5)                  # one request

Health checks, a per-request timeout and bounded retries (connection errors and
UNAVAILABLE only: a bad request is not retried). `AsyncTritonRetriever` is the asyncio twin.
"""

from __future__ import annotations

import time

import numpy as np

from .gallery import Hit

OUTPUTS = ["IMAGE_IDS", "BOXES", "SCORES", "INSTANCE_KEYS", "DETECTION_SCORES", "PATHS", "TRUNCATED"]


class TritonError(RuntimeError):
    pass


def _split_url(url: str, protocol: str | None) -> tuple[str, str]:
    for scheme in ("grpc", "http"):
        if url.startswith(f"{scheme}://"):
            return url[len(scheme) + 3 :], scheme
    return url, protocol or "grpc"


def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        import tritonclient.grpc as m  # tritonclient: the triton extra, only for remote search
        import tritonclient.grpc.aio as a
    elif protocol == "http":
        import tritonclient.http as m
        import tritonclient.http.aio as a
    else:
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return a if aio else m


def _inputs(mod, texts: list[str], k: int, gallery: str | None):
    arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
    ins = [mod.InferInput("TEXT", list(arr.shape), "BYTES"), mod.InferInput("K", [len(texts), 1], "INT32")]
    ins[0].set_data_from_numpy(arr)
    ins[1].set_data_from_numpy(np.full((len(texts), 1), k, np.int32))
    if gallery is not None:
        g = mod.InferInput("GALLERY", [len(texts), 1], "BYTES")
        g.set_data_from_numpy(np.array([[gallery.encode("utf-8")]] * len(texts), dtype=object))
        ins.append(g)
    return ins, [mod.InferRequestedOutput(n) for n in OUTPUTS]


def _hits(result) -> tuple[list[list[Hit]], list[bool]]:
    o = {n: result.as_numpy(n) for n in OUTPUTS}
    out = []
    for i in range(o["IMAGE_IDS"].shape[0]):
        row = []
        for j in range(o["IMAGE_IDS"].shape[1]):
            if o["IMAGE_IDS"][i, j] < 0:
                break
            path = o["PATHS"][i, j]
            row.append(
                Hit(
                    int(o["IMAGE_IDS"][i, j]),
                    path.decode("utf-8") if isinstance(path, bytes) else str(path),
                    tuple(float(v) for v in o["BOXES"][i, j]),
                    float(o["SCORES"][i, j]),
                    int(o["INSTANCE_KEYS"][i, j]),
                    float(o["DETECTION_SCORES"][i, j]),
                )
            )
        out.append(row)
    return out, [bool(t) for t in o["TRUNCATED"].reshape(-1)]


def _validate(expression: str | list[str]) -> tuple[list[str], bool]:
    many = not isinstance(expression, str)
    texts = list(expression) if many else [expression]
    if not texts or any(not t or not t.strip() for t in texts):
        raise ValueError("empty expression")
    return texts, many


def _retryable(e: Exception) -> bool:
    text = str(e).lower()
    return any(s in text for s in ("unavailable", "connection refused", "failed to connect", "connection reset"))


class TritonRetriever:
    def __init__(
        self, url: str, protocol: str | None = None, timeout_s: float = 10.0, retries: int = 2, model: str = "retrieve"
    ):
        self.url, self.protocol = _split_url(url, protocol)
        self.mod = _module(self.protocol)
        self.client = self.mod.InferenceServerClient(self.url)
        self.timeout_s, self.retries, self.model = timeout_s, retries, model
        self.last_truncated: list[bool] = []

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

    def search(
        self, expression: str | list[str], k: int = 10, gallery: str | None = None
    ) -> list[Hit] | list[list[Hit]]:
        """Hits for one expression, or a list per expression (sent as one request)."""
        texts, many = _validate(expression)
        inputs, outputs = _inputs(self.mod, texts, k, gallery)
        hits, self.last_truncated = _hits(self._infer(self.model, inputs, outputs))
        return hits if many else hits[0]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Query vectors [N, D] and truncation flags from the server's `encode_query`
        ensemble: what a search front end (the Ray Serve app's `--encoder`) calls instead
        of running the text encoder itself, when Triton serves the models on GPU hosts."""
        texts, _ = _validate(list(texts))
        arr = np.array([[t.encode("utf-8")] for t in texts], dtype=object)
        text = self.mod.InferInput("TEXT", list(arr.shape), "BYTES")
        text.set_data_from_numpy(arr)
        outputs = [self.mod.InferRequestedOutput(n) for n in ("query", "truncated")]
        res = self._infer("encode_query", [text], outputs)
        return res.as_numpy("query").astype(np.float32), [bool(t) for t in res.as_numpy("truncated").reshape(-1)]

    def _infer(self, model: str, inputs: list, outputs: list):
        """One request, retried with backoff while the failure is transient (unavailable,
        timed out); a client error or the last failure raises TritonError naming the model."""
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        for attempt in range(self.retries + 1):
            try:
                return self.client.infer(model, inputs, outputs=outputs, **kwargs)
            except Exception as e:
                if attempt == self.retries or not _retryable(e):
                    raise TritonError(f"{self.protocol}://{self.url} {model}: {_message(e)}") from None
                time.sleep(0.1 * 2**attempt)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonRetriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTritonRetriever:
    """The asyncio twin: `await r.search(...)`; many searches in flight on one client."""

    def __init__(self, url: str, protocol: str | None = None, timeout_s: float = 10.0, model: str = "retrieve"):
        self.url, self.protocol = _split_url(url, protocol)
        self.mod = _module(self.protocol, aio=True)
        self.client = self.mod.InferenceServerClient(self.url)
        self.timeout_s, self.model = timeout_s, model

    async def search(self, expression: str | list[str], k: int = 10, gallery: str | None = None):
        texts, many = _validate(expression)
        inputs, outputs = _inputs(self.mod, texts, k, gallery)
        try:
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            res = await self.client.infer(self.model, inputs, outputs=outputs, **kwargs)
        except Exception as e:
            raise TritonError(f"{self.protocol}://{self.url} {self.model}: {_message(e)}") from None
        hits, _ = _hits(res)
        return hits if many else hits[0]

    async def close(self) -> None:
        await self.client.close()


def _message(e: Exception) -> str:
    msg = getattr(e, "message", None)
    return (msg() if callable(msg) else msg) or str(e)
