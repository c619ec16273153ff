"""`Metrics`: what a served path says about itself, in Prometheus' text format.

    reir_requests_total{outcome}          ok, invalid (4xx), not_found, partial, refused, error
    reir_stage_seconds{stage}             queue, encode, search, merge (histograms)
    reir_batch_size                       requests answered per batch (histogram)
    reir_queue_depth                      requests waiting for a batch now
    reir_gallery_generation{gallery,shard}  the committed generation searches answer from
    reir_gallery_rows{gallery,shard}        live instances
    reir_gallery_agreement{gallery,shard,measure}  top1 / top10 of the last self-check

Each service owns its registry, so two services in one process (or a test) never share
counters. The embedded path renders it with `render()`; the Ray Serve app serves it at
GET /reir/metrics; Triton's `retrieve` model reports the same names through Triton's own
metrics endpoint (:8002), by `triton_families`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("ok", "invalid", "not_found", "partial", "refused", "error")
STAGES = ("queue", "encode", "search", "merge")
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, before_render: Callable[[], None] | None = None, families=None) -> None:
        """`before_render()`: brings the gauges up to date at each scrape (the galleries').
        `families`: where the series live, prometheus_client's registry here (None) or
        Triton's metrics API inside a Triton model (`triton_families(pb_utils)`)."""
        self.before_render = before_render
        self.registry = CollectorRegistry()
        make = families or _prometheus(self.registry)
        self.requests = make("counter", "reir_requests", "Search requests by outcome", ["outcome"])
        for outcome in OUTCOMES:  # every series exists from the start: a rate of 0 is a fact
            self.requests.labels(outcome)
        self.stage = make("histogram", "reir_stage_seconds", "Time per stage of a request", ["stage"], LATENCY_BUCKETS)
        self.batch = make("histogram", "reir_batch_size", "Requests answered per batch", [], BATCH_BUCKETS)
        self.queue = make("gauge", "reir_queue_depth", "Requests waiting for a batch", [])
        shard = ["gallery", "shard"]
        self.generation = make("gauge", "reir_gallery_generation", "Committed generation served", shard)
        self.rows = make("gauge", "reir_gallery_rows", "Live instances served", shard)
        self.agreement = make(
            "gauge", "reir_gallery_agreement", "Agreement with the exact ranking", [*shard, "measure"]
        )

    def outcome(self, outcome: str, n: int = 1) -> None:
        self.requests.labels(outcome).inc(n)

    def gallery(self, name: str, gallery) -> None:
        """Record a gallery's state: each shard's generation, rows and agreement."""
        for s in gallery.shards:
            self.shard(name, shard_state(s))

    def shard(self, name: str, state: dict) -> None:
        labels = (name, str(state["shard"]))
        self.generation.labels(*labels).set(state["generation"])
        self.rows.labels(*labels).set(state["rows"])
        for measure, value in state["agreement"].items():
            self.agreement.labels(*labels, measure).set(value)

    def render(self) -> bytes:
        if self.before_render is not None:
            self.before_render()
        return generate_latest(self.registry)


def shard_state(shard) -> dict:
    """What the gallery gauges show of one shard (a plain dict: a Ray shard replica sends it)."""
    index = shard.index
    cal = index.manifest.get("calibration") or {}
    # an exact scan is the ranking itself; the index's figures are its last self-check's
    agreement = {m: float(cal[m]) for m in ("top1", "top10")} if index.uses_candidates else {"top1": 1.0, "top10": 1.0}
    return {"shard": shard.number, "generation": shard.generation, "rows": index.store.live, "agreement": agreement}


def _prometheus(registry: CollectorRegistry):
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}

    def make(kind: str, name: str, doc: str, labels: list[str], buckets=None):
        extra = {"buckets": buckets} if buckets else {}
        return kinds[kind](name, doc, labels, registry=registry, **extra)

    return make


def triton_families(pb_utils):
    """The same series through Triton's custom metrics (its python backend's MetricFamily),
    so Triton's own endpoint (:8002/metrics) shows them beside its queue and compute times."""

    def make(kind: str, name: str, doc: str, labels: list[str], buckets=None):
        if kind == "counter":
            name += "_total"  # the name prometheus_client gives a counter's series
        family = pb_utils.MetricFamily(name=name, description=doc, kind=getattr(pb_utils.MetricFamily, kind.upper()))
        return _TritonSeries(family, labels, buckets)

    return make


class _TritonSeries:
    """prometheus_client's calls (labels, inc, set, observe, time) on a Triton metric family."""

    def __init__(self, family, names: list[str], buckets=None, values: tuple = ()):
        self.family, self.names, self.buckets = family, names, buckets
        self._children: dict[tuple, _TritonSeries] = {}
        self._metric = None
        if len(values) == len(names):
            extra = {"buckets": [float(b) for b in buckets]} if buckets else {}
            self._metric = family.Metric(labels=dict(zip(names, values, strict=True)), **extra)

    def labels(self, *values) -> _TritonSeries:
        key = tuple(str(v) for v in values)
        if key not in self._children:
            self._children[key] = _TritonSeries(self.family, self.names, self.buckets, key)
        return self._children[key]

    def inc(self, n: float = 1) -> None:
        self._metric.increment(float(n))

    def set(self, value: float) -> None:
        self._metric.set(float(value))

    def observe(self, value: float) -> None:
        self._metric.observe(float(value))

    @contextmanager
    def time(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(time.perf_counter() - start)
