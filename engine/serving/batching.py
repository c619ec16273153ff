"""`Batcher`: requests from many threads answered in batches, and refused when late.

Why: on a few cores, a thread per client makes the clients fight for the cores (each
ONNX Runtime call with its own threads, each search with its own numpy temporaries), so
throughput falls as clients are added. Here one worker answers everything: it takes all
the requests waiting when it is free (up to `max_batch`) and answers them with one
`answer_batch` call (one text encoding, one search per gallery), so more clients make
larger batches, not more threads. Nothing waits on a timer while the worker is idle: a
lone request goes at once, and batches form from what arrived while it was busy (under
load the worker lingers `linger_s` so that clients it just answered join the next batch
rather than form a second cohort that alternates with the first).

`Admission` bounds the wait. It keeps the measured cost of a request; a request that would
queue behind more than `max_queue_s` of work is refused at once (`Unavailable`, with the
time after which to retry), so a burst past capacity gets fast refusals and the admitted
requests keep their latency, instead of everyone waiting in an unbounded queue.

    service = Batcher(SearchService.embedded(Engine.open(bundle, threads=2), root))
    service.search("the red circle", gallery="main")   # from any number of threads
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

from reir.engine.serving.contract import Client, SearchRequest, SearchResponse, ServiceError, Unavailable
from reir.engine.serving.metrics import Metrics


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 16  # requests per answer_batch call
    max_queue_s: float = 0.05  # refuse a request that would wait longer than this for the worker
    # under load (requests were waiting when the last batch ended), wait this long for the
    # clients just answered to send their next request, so they join the same batch
    linger_s: float = 0.001

    def __post_init__(self):
        if not (isinstance(self.max_batch, int) and self.max_batch >= 1):
            raise ValueError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        if not (self.max_queue_s > 0 and math.isfinite(self.max_queue_s)):
            raise ValueError(f"max_queue_s must be a positive number of seconds, got {self.max_queue_s!r}")


class Admission:
    """Whether a request may join the queue: the work ahead of it, priced at the measured
    seconds per request (the median of the last batches: a cold first call or one stall
    does not close the door), must fit in `max_queue_s`. Requests that fit in the next
    batch (`min_ahead`) are always let in, and nothing is refused before `WARM` batches
    were measured (the first calls of a process pay for its warm-up)."""

    WINDOW = 32
    WARM = 4

    def __init__(self, max_queue_s: float, min_ahead: int = 0):
        self.max_queue_s, self.min_ahead = max_queue_s, min_ahead
        self._costs: deque[float] = deque(maxlen=self.WINDOW)
        self.per_request_s = 0.0

    def wait_s(self, ahead: int) -> float:
        return ahead * self.per_request_s

    def check(self, ahead: int) -> None:
        wait = self.wait_s(ahead)
        if ahead >= self.min_ahead and len(self._costs) >= self.WARM and wait > self.max_queue_s:
            raise Unavailable(
                f"overloaded: {ahead} requests ahead, about {1000 * wait:.0f} ms of work "
                f"(this server queues at most {1000 * self.max_queue_s:.0f} ms)",
                retry_after=max(wait - self.max_queue_s, self.per_request_s),  # when there is room again
            )

    def answered(self, n: int, seconds: float) -> None:
        self._costs.append(seconds / max(n, 1))
        self.per_request_s = float(sorted(self._costs)[len(self._costs) // 2])


class Batcher(Client):
    def __init__(self, service, policy: BatchPolicy | None = None):
        """`service`: anything with `answer_batch(requests) -> answers or errors` (a SearchService)."""
        self.service, self.policy = service, policy or BatchPolicy()
        self.metrics: Metrics = getattr(service, "metrics", None) or Metrics()
        self.admission = Admission(self.policy.max_queue_s, self.policy.max_batch)
        self._queue: deque[tuple[SearchRequest, Future, float]] = deque()
        self._busy = 0  # requests the worker is answering now
        self._closed = False
        self._cv = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="reir-batcher", daemon=True)
        self._worker.start()

    def answer(self, request: SearchRequest) -> SearchResponse:
        return self.submit(request).result()

    def submit(self, request: SearchRequest) -> Future:
        """Queue a request; its Future holds the answer or the error. Unavailable at once
        when the queue is full (the work ahead exceeds the policy's `max_queue_s`)."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise ServiceError("this service is closed")
            try:
                self.admission.check(len(self._queue) + self._busy)
            except Unavailable:
                self.metrics.outcome("refused")
                raise
            self._queue.append((request, future, time.monotonic()))
            self.metrics.queue.set(len(self._queue))
            self._cv.notify()
        return future

    def _run(self) -> None:
        loaded = False  # requests were waiting when the last batch ended
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                until = time.monotonic() + self.policy.linger_s
                while loaded and len(self._queue) < self.policy.max_batch and not self._closed:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = [self._queue.popleft() for _ in range(min(self.policy.max_batch, len(self._queue)))]
                self._busy = len(batch)
                self.metrics.queue.set(len(self._queue))
            start = time.monotonic()
            for _, _, queued in batch:
                self.metrics.stage.labels("queue").observe(start - queued)
            self.metrics.batch.observe(len(batch))
            try:
                answers = self.service.answer_batch([r for r, _, _ in batch], since=batch[0][2])
            except Exception as e:  # the service's fault: each request of the batch gets it
                self.metrics.outcome("error", len(batch))
                answers = [e] * len(batch)
            for (_, future, _), a in zip(batch, answers, strict=True):
                if isinstance(a, Exception):
                    future.set_exception(a)
                else:
                    future.set_result(a)
            with self._cv:
                self.admission.answered(len(batch), time.monotonic() - start)
                self._busy = 0
                loaded = bool(self._queue)

    def close(self) -> None:
        """Answer what is queued, stop the worker, close the service."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._worker.join()
        self.service.close()
