"""Our load generators: closed-loop (N clients, each sends when answered) and open-loop (a
fixed arrival rate, latency counted from each request's scheduled send time).

Closed loop shows throughput at a concurrency, but a stalled server slows its own clients
and hides its queue. Open loop does not (wrk2's correction for coordinated omission): a
request scheduled at t and answered at t + d counts d even if the sender was held up, so
the latency-vs-offered-load curve shows where the queue starts (the knee).

A refusal (`Unavailable`: HTTP 503, gRPC UNAVAILABLE) is counted apart from answers: a
closed-loop client waits its `retry_after` (jittered) and sends again; an open-loop one
records how fast it was refused and moves on.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from reir.engine.serving.contract import Unavailable

from .common import summarise_ms

Send = Callable[[str], object]


def closed_loop(make_search: Callable[[], Send], texts: list[str], concurrency: int) -> dict:
    """`concurrency` threads, each with its own client from `make_search()`, each sending
    its next text when the last one was answered. A refused request is retried after the
    server's retry_after; its latency runs from the first send to the answer."""
    refused = [0] * concurrency

    def worker(c: int) -> list[float]:
        search, out = make_search(), []
        for t in texts[c::concurrency]:
            start = time.perf_counter()
            while True:
                try:
                    search(t)
                    break
                except Unavailable as e:
                    refused[c] += 1
                    time.sleep(e.retry_after * random.uniform(0.5, 1.5))
            out.append(time.perf_counter() - start)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = [x for part in pool.map(worker, range(concurrency)) for x in part]
    wall = time.perf_counter() - t0
    return {**summarise_ms(lat), "qps": round(len(texts) / wall, 1), "refused": sum(refused)}


def open_loop(send: Send, texts: list[str], rate: float, senders: int = 128) -> dict:
    """Send `texts` at `rate` per second on a fixed schedule (request i at t0 + i / rate),
    from up to `senders` threads; latency from each request's scheduled time."""
    lat, refusals, errors = [], [], []
    lock = threading.Lock()

    def one(text: str, due: float) -> None:
        try:
            send(text)
            with lock:
                lat.append(time.perf_counter() - due)
        except Unavailable:
            with lock:
                refusals.append(time.perf_counter() - due)
        except Exception as e:  # counted, never hidden: a load test must not stop at the first
            with lock:
                errors.append(repr(e))

    t0 = time.perf_counter() + 0.05
    with ThreadPoolExecutor(senders) as pool:
        for i, text in enumerate(texts):
            due = t0 + i / rate
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            pool.submit(one, text, due)
    wall = time.perf_counter() - t0
    out = {"offered_qps": round(rate, 1), "answered_qps": round(len(lat) / wall, 1), "sent": len(texts)}
    out |= summarise_ms(lat) if lat else {"p50_ms": None, "p99_ms": None, "n": 0}
    out["refused"] = len(refusals)
    out["refusal_p99_ms"] = round(1000 * float(np.percentile(refusals, 99)), 2) if refusals else None
    out["errors"] = len(errors)
    if errors:
        out["first_error"] = errors[0]
    return out


def knee(rows: list[dict], slack: float = 0.95) -> float | None:
    """The highest offered rate that was still served: answered ≥ `slack` × offered, with
    p99 within 3 × the p99 at the lowest rate. None: not even the lowest was."""
    rows = sorted(rows, key=lambda r: r["offered_qps"])
    if not rows or rows[0]["p99_ms"] is None:
        return None
    base, best = rows[0]["p99_ms"], None
    for r in rows:
        if r["p99_ms"] is not None and r["answered_qps"] >= slack * r["offered_qps"] and r["p99_ms"] <= 3 * base:
            best = r["offered_qps"]
    return best
