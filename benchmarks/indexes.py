"""Search at scale: the gallery's index against the exact scan and the alternatives, on the
model's own vectors at its real dimension.

Tiers hold whole images of the encoded benchmark gallery: up to its size the real ones,
beyond it images drawn at random and jittered by 10 % of the per-dimension spread (no two
vectors equal). Each tier is written straight into a real gallery (SQLite + index), and
every design reads its vectors from that gallery's store, so nothing holds a second copy of
10M vectors. Queries are text vectors of held-out test expressions; the truth is the exact
ranking over the stored (f16) vectors. Every design returns candidate instances that are then
scored exactly and reduced to the best instance per image, so a design is judged on what it
finds, not on its score estimates. Per design and setting: top-1 image agreement, top-10
image overlap, instance recall@10, one query at a time on one thread (p50/p99), build time,
bytes per instance.

Designs: the gallery itself (reir.engine.Gallery: its index and its own calibration; the
product path), the same index at fixed candidate sizes (its curve), the exact scan (faiss's
fused f16 scan, the fastest exact scan here; above 2M instances the gallery's own scan, as a
second 9 GB copy does not fit beside the build), usearch HNSW on raw inner product (the
gallery's index before), and FAISS IVF (f16 lists, inner product).
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from reir.engine.gallery.gallery import Gallery
from reir.engine.gallery.records import NewImage
from reir.engine.runtime.detections import Detections
from reir.engine.search.agreement import TIE, agreement
from reir.engine.search.candidates import DEFAULT
from reir.engine.search.vectors import VectorStore

from .common import EncodedGallery, summarise_ms

SIZES = (50_000, 250_000, 1_000_000)
FULL_SIZES = (*SIZES, 10_000_000)
QUERIES = 300
HNSW_EF = (64, 256, 1024)
SECOND_COPY_MAX = 2_000_000  # above this, designs that keep their own copy of the vectors are not run
IVF_PROBES = (8, 32, 128)
SWEEP = tuple(  # settings of the curve
    {"k_factor": kf, "rerank": rr} for kf, rr in ((2, 320), (8, 320), (32, 320), (32, 1280), (128, 1280))
)
FILTER_SHARE = 100  # tag buckets: a filter on one keeps 1 % of the images


def tier_images(g: EncodedGallery, n: int, seed: int = 0) -> Iterator[Detections]:
    """Whole images until `n` instances: the encoded gallery's own, in order, while they last;
    beyond them, images drawn at random and jittered."""
    counts = np.diff(g.offsets)
    total = 0
    if n <= len(g.embeddings):
        for j in range(len(counts)):
            if total >= n:
                return
            lo, hi = g.offsets[j], g.offsets[j + 1]
            total += hi - lo
            yield Detections(g.boxes[lo:hi], g.scores[lo:hi], g.embeddings[lo:hi])
        return
    rng = np.random.default_rng(seed)
    std = g.embeddings.std(0) * 0.1
    while total < n:
        j = int(rng.integers(0, len(counts)))
        lo, hi = g.offsets[j], g.offsets[j + 1]
        noise = rng.standard_normal((hi - lo, g.embeddings.shape[1]), np.float32) * std
        total += hi - lo
        yield Detections(g.boxes[lo:hi], g.scores[lo:hi], g.embeddings[lo:hi] + noise)


def build(
    g: EncodedGallery, n: int, sample: np.ndarray, path: Path, seed: int = 0, candidates: str = DEFAULT
) -> tuple[Gallery, float]:
    """The tier as a real gallery (of the `candidates` design); its instance keys are 1..N in
    row order. Seconds to build."""
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    gal = Gallery.create(path, g.embeddings.shape[1], "f16", model="benchmark", queries=sample, candidates=candidates)
    batch = []
    for i, dets in enumerate(tqdm(tier_images(g, n, seed), desc=f"gallery of {n:,}", unit="img", leave=False)):
        batch.append(NewImage(f"img{i}", f"{i:064x}", 128, 128, 0, dets, {"bucket": str(i % FILTER_SHARE)}))
        if len(batch) == 2000:
            gal.add(batch, save_index=False)
            batch = []
    gal.add(batch, save_index=False)
    gal.save()
    keys = gal.shards[0].index.store.keys.array
    assert keys[0] == 1 and keys[-1] == len(keys), "the gallery numbers its instances 1..N in row order"
    return gal, time.perf_counter() - t


def measure(search: Callable[[np.ndarray], np.ndarray], store: VectorStore, q: np.ndarray, exact: list) -> dict:
    """Agreement and latency of `search(q) -> candidate rows` (scored exactly here)."""
    for v in q[:5]:
        search(v)
    found, lat = [], []
    for v in q:
        t = time.perf_counter()
        rows = np.asarray(search(v), np.int64)
        lat.append(time.perf_counter() - t)
        rows = rows[rows >= 0]
        sc = store.scores(rows, v)
        order = np.lexsort((rows, -sc))
        found.append((rows[order], sc[order]))
    s = summarise_ms(lat)
    a = agreement(found, exact[: len(q)], store.images.array)
    return {**a.as_dict(), "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}


def _row(n: int, design: str, setting, build_s: float, resident: float, disk: float | None, m: dict) -> dict:
    return {
        "vectors": n,
        "design": design,
        "setting": setting,
        **m,
        "build_s": round(build_s, 1),
        "bytes_resident": round(resident, 1),
        "bytes_disk": None if disk is None else round(disk, 1),
    }


def gallery_rows(gal: Gallery, build_s: float, q: np.ndarray, exact: list) -> list[dict]:
    """The product: its default search (the call a user makes), and its curve."""
    info, idx = gal.info(), gal.shards[0].index
    store = idx.store
    n = store.rows
    index = info.per_shard[0].index
    per = index.bytes_per_instance
    disk = info.bytes_on_disk / n

    def default(v):  # best instance per image, k = 10: keys are rows + 1
        return [h.instance_key - 1 for h in gal.search(v, k=10)[0]]

    m = measure(default, store, q, exact)
    m["recall10"] = measure(
        lambda v: [h.instance_key - 1 for h in gal.search(v, k=10, per_image=False)[0]], store, q, exact
    )["recall10"]
    cand = index.candidates or {}
    setting = f"{index.kind}: " + ", ".join(f"{k} {v}" for k, v in cand.items())
    rows = [_row(n, "gallery (default)", setting, build_s, per["hot"], disk, m)]
    if idx.candidates_index is None:
        return rows
    design = type(idx.candidates_index)
    for values in SWEEP:
        s = design.setting(values)
        m = measure(lambda v, s=s: idx.candidates(v, s), store, q, exact)
        label = ", ".join(f"{k} {v}" for k, v in values.items())
        rows.append(_row(n, "gallery index, fixed", label, build_s, per["hot"], None, m))
    return rows


def filtered(gal: Gallery, q: np.ndarray, k: int = 10) -> dict:
    """A tag filter keeping 1 % of the images: agreement with the exact filtered ranking and
    latency beside the unfiltered search, in one run."""
    tags = {"bucket": "7"}
    lat_f, lat_u, top1, top10 = [], [], [], []

    def tie(s: float, ref: float) -> bool:
        return s >= ref - TIE * max(1.0, abs(ref))

    for v in q:
        t = time.perf_counter()
        gal.search(v, k=k)
        lat_u.append(time.perf_counter() - t)
        t = time.perf_counter()
        f = gal.search(v, k=k, tags=tags)[0]
        lat_f.append(time.perf_counter() - t)
        e = gal.search(v, k=k, tags=tags, exact=True)[0]
        top1.append(bool(f) and (f[0].image_id == e[0].image_id or tie(f[0].score, e[0].score)))
        ids = {h.image_id for h in e}
        top10.append(sum(h.image_id in ids or tie(h.score, e[-1].score) for h in f) / max(1, len(e)))
    fs, us = summarise_ms(lat_f), summarise_ms(lat_u)
    return {
        "vectors": gal.shards[0].index.store.rows,
        "filter": "1 % of images",
        "top1": round(float(np.mean(top1)), 4),
        "top10": round(float(np.mean(top10)), 4),
        "filtered_p50_ms": fs["p50_ms"],
        "filtered_p99_ms": fs["p99_ms"],
        "unfiltered_p50_ms": us["p50_ms"],
        "ratio_p50": round(fs["p50_ms"] / us["p50_ms"], 2),
    }


def _chunks(store: VectorStore, step: int = 262144) -> Iterator[np.ndarray]:
    for s in range(0, store.rows, step):
        yield store.vectors(slice(s, min(s + step, store.rows)))


def exact_rows(gal: Gallery, q: np.ndarray, exact: list, fetch: int) -> list[dict]:
    store = gal.shards[0].index.store
    n = store.rows
    if n > SECOND_COPY_MAX:  # the gallery's own scan of its mapped vectors, on a tenth of the queries
        sub = q[: max(20, len(q) // 10)]
        m = measure(lambda v: store.top(v, fetch)[0][0], store, sub, exact)
        return [_row(n, "exact scan (the gallery's)", f"{len(sub)} queries", 0.0, 0.0, None, m)]
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    flat = faiss.IndexScalarQuantizer(store.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for x in _chunks(store):
        flat.add(x)
    build_s = time.perf_counter() - t
    m = measure(lambda v: flat.search(v[None], fetch)[1][0], store, q, exact)
    return [_row(n, "exact scan (faiss f16)", f"{len(q)} queries", build_s, store.dim * 2, None, m)]


def usearch_rows(gal: Gallery, q: np.ndarray, exact: list, fetch: int) -> list[dict]:
    import onnxruntime  # noqa: F401  (load ORT's libraries before usearch's: the reverse order segfaults)
    from usearch.index import Index  # the bench extra

    store = gal.shards[0].index.store
    n = store.rows
    t = time.perf_counter()
    idx = Index(ndim=store.dim, metric="ip", dtype="f16", connectivity=16, expansion_add=128)
    s = 0
    for x in tqdm(_chunks(store, 100_000), desc=f"usearch HNSW {n:,}", unit="chunk", leave=False):
        idx.add(np.arange(s, s + len(x)), x, threads=2)
        s += len(x)
    build_s = time.perf_counter() - t
    rows = []
    for ef in HNSW_EF:
        idx.expansion_search = ef
        m = measure(lambda v: idx.search(v, fetch, threads=1).keys, store, q, exact)
        rows.append(_row(n, "usearch HNSW ip f16 (before)", f"ef {ef}", build_s, idx.memory_usage / n, None, m))
    return rows


def ivf_rows(gal: Gallery, q: np.ndarray, exact: list, fetch: int) -> list[dict]:
    store = gal.shards[0].index.store
    n = store.rows
    faiss.omp_set_num_threads(2)
    nlist = int(4 * np.sqrt(n))
    t = time.perf_counter()
    quant = faiss.IndexFlatIP(store.dim)
    fp16, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    idx = faiss.IndexIVFScalarQuantizer(quant, store.dim, nlist, fp16, ip)
    pick = np.sort(np.random.default_rng(1).choice(n, min(n, 64 * nlist), replace=False))
    idx.train(store.vectors(pick))
    for x in _chunks(store):
        idx.add(x)
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    rows = []
    for probe in IVF_PROBES:
        idx.nprobe = probe
        m = measure(lambda v: idx.search(v[None], fetch)[1][0], store, q, exact)
        rows.append(_row(n, f"faiss IVF{nlist} f16 ip", f"nprobe {probe}", build_s, store.dim * 2 + 8, None, m))
    return rows


def run(g: EncodedGallery, sample: np.ndarray, sizes, work: Path, n_queries: int = QUERIES, seed: int = 0) -> dict:
    """Rows per tier and design, and the filtered search per tier."""
    q = g.queries[np.random.default_rng(seed).permutation(len(g.queries))[:n_queries]].astype(np.float32)
    out = {"rows": [], "filtered": [], "queries": len(q), "skipped": []}
    work.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        path = work / f"gallery-{n}"
        gal, build_s = build(g, n, sample, path, seed)
        store = gal.shards[0].index.store
        fetch = 10 * store.max_per_image  # k images x the most instances an image holds
        exact = store.top(q, fetch)  # the truth: the exact ranking over the stored vectors
        out["rows"] += gallery_rows(gal, build_s, q, exact)
        out["filtered"].append({**filtered(gal, q), "calibration": gal.info().per_shard[0].index.agreement})
        out["rows"] += exact_rows(gal, q, exact, fetch)
        if store.rows <= SECOND_COPY_MAX:
            out["rows"] += usearch_rows(gal, q, exact, fetch)
            out["rows"] += ivf_rows(gal, q, exact, fetch)
        else:
            out["skipped"].append(
                f"usearch HNSW and FAISS IVF at {store.rows:,}: each keeps its own 9 GB copy of the vectors, "
                "and the HNSW build takes hours on two cores (both are far from the targets at 1M already)"
            )
        gal.close()
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
    return out
