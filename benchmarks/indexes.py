"""Search at scale: the gallery's index against the exact scan and the alternatives, on the
model's own vectors at its real dimension.

Tiers hold whole images of the encoded benchmark gallery: up to its size the real ones,
beyond it images drawn at random and jittered by 10 % of the per-dimension spread (no two
vectors equal). Queries are text vectors of held-out test expressions; the truth is the
exact ranking over the stored (f16) vectors. Every design returns candidate instances that
are then scored exactly and reduced to the best instance per image, so a design is judged
on what it finds, not on its score estimates. Per design and setting: top-1 image agreement,
top-10 image overlap, instance recall@10, one query at a time on one thread (p50/p99),
build time, bytes per instance.

Designs: the gallery itself (reir.engine.Gallery: SQLite, the projected index, its own
calibration; the product path), the same index at fixed candidate sizes (its curve), the
exact scan (faiss's fused f16 scan, the fastest exact scan here), usearch HNSW on raw inner
product (the gallery's index before), and FAISS IVF (f16 lists, inner product).
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from reir.engine.detections import Detections
from reir.engine.gallery import Gallery, NewImage
from reir.engine.self_check import TIE, agreement

from .common import EncodedGallery, summarise_ms

SIZES = (50_000, 250_000, 1_000_000)
FULL_SIZES = (*SIZES, 10_000_000)
QUERIES = 300
HNSW_EF = (64, 256, 1024)
HNSW_MAX = 2_000_000  # above this an HNSW build takes hours on two cores: not run
IVF_PROBES = (8, 32, 128)
SWEEP = ((2, 320), (8, 320), (32, 320), (32, 1280), (128, 1280))  # (k_factor, rerank) of the curve
FILTER_SHARE = 100  # tag buckets: a filter on one keeps 1 % of the images


def tier(g: EncodedGallery, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(vectors f16 [N, D], image of each row, boxes, detection scores): whole images, real up to
    the encoded gallery's size, then drawn and jittered."""
    counts = np.diff(g.offsets)
    if n <= len(g.embeddings):
        m = int(np.searchsorted(g.offsets, n))
        rows = slice(0, int(g.offsets[m]))
        return (
            g.embeddings[rows].astype(np.float16),
            np.repeat(np.arange(m), counts[:m]),
            g.boxes[rows],
            g.scores[rows],
        )
    rng = np.random.default_rng(seed)
    picks = []
    total = 0
    while total < n:
        for j in rng.integers(0, len(counts), 65536):
            picks.append(j)
            total += counts[j]
            if total >= n:
                break
    picks = np.array(picks)
    rows = np.concatenate([np.arange(g.offsets[j], g.offsets[j + 1]) for j in picks])
    std = g.embeddings.std(0) * 0.1
    out = np.empty((len(rows), g.embeddings.shape[1]), np.float16)
    for s in range(0, len(rows), 262144):
        part = rows[s : s + 262144]
        noise = rng.standard_normal((len(part), out.shape[1]), np.float32) * std
        out[s : s + len(part)] = g.embeddings[part] + noise
    return out, np.repeat(np.arange(len(picks)), counts[picks]), g.boxes[rows], g.scores[rows]


def truth(x: np.ndarray, q: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Exact top-n rows per query over f16 vectors (the stored precision), in f32 arithmetic."""
    best = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in q]
    for s in tqdm(range(0, len(x), 65536), desc="exact truth", unit="chunk", leave=False):
        sc = q @ x[s : s + 65536].astype(np.float32).T
        part = np.argpartition(-sc, min(n, sc.shape[1] - 1), axis=1)[:, :n]
        for i in range(len(q)):
            r = np.concatenate([best[i][0], part[i] + s])
            v = np.concatenate([best[i][1], sc[i, part[i]]])
            keep = np.argsort(-v, kind="stable")[:n]
            best[i] = (r[keep], v[keep])
    return best


def measure(
    search: Callable[[np.ndarray], np.ndarray], x: np.ndarray, q: np.ndarray, exact: list, images: np.ndarray
) -> dict:
    """Agreement and latency of `search(q) -> candidate rows` (scored exactly here)."""
    for v in q[:5]:
        search(v)
    found, lat = [], []
    for v in q:
        t = time.perf_counter()
        rows = np.asarray(search(v), np.int64)
        lat.append(time.perf_counter() - t)
        rows = rows[rows >= 0]
        sc = x[rows].astype(np.float32) @ v
        order = np.lexsort((rows, -sc))
        found.append((rows[order], sc[order]))
    s = summarise_ms(lat)
    return {**agreement(found, exact, images).as_dict(), "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"]}


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


def gallery_rows(n: int, x, images, boxes, scores, q, exact, sample, work: Path) -> tuple[list[dict], dict]:
    """The product: a real gallery (SQLite + index), its default search and its curve, and a
    filtered search."""

    path = work / f"gallery-{n}"
    shutil.rmtree(path, ignore_errors=True)
    t = time.perf_counter()
    g = Gallery.create(path, x.shape[1], "f16", model="benchmark", queries=sample)
    edges = np.concatenate([[0], np.flatnonzero(np.diff(images)) + 1, [len(images)]])
    batch = []
    for i in tqdm(range(len(edges) - 1), desc=f"gallery of {n:,}", unit="img", leave=False):
        lo, hi = edges[i], edges[i + 1]
        dets = Detections(boxes[lo:hi], scores[lo:hi], x[lo:hi].astype(np.float32))
        batch.append(NewImage(f"img{i}", f"{i:064x}", 128, 128, 0, dets, {"bucket": str(i % FILTER_SHARE)}))
        if len(batch) == 2000:
            g.add(batch, save_index=False)
            batch = []
    g.add(batch, save_index=False)
    g.save()
    build = time.perf_counter() - t
    info = g.info()
    idx = g.index
    per = info["index"]["bytes_per_instance"]
    sqlite = (path / "gallery.sqlite").stat().st_size / n
    keys = idx.store.keys.array
    assert keys[0] == 1 and keys[-1] == len(keys), "the gallery numbers its instances 1..N in tier order"

    def default(v):  # the product call: best instance per image, k = 10
        return [h.instance_key - 1 for h in g.search(v, k=10)[0]]

    m = measure(default, x, q, exact, images)
    inst = measure(lambda v: [h.instance_key - 1 for h in g.search(v, k=10, per_image=False)[0]], x, q, exact, images)
    m["recall10"] = inst["recall10"]
    cand = info["index"].get("candidates") or {}
    setting = f"calibrated: k_factor {cand.get('k_factor')}, rerank {cand.get('rerank')}"
    rows = [_row(n, "gallery (default)", setting, build, per["hot"], per.get("index_on_disk", 0) + sqlite, m)]
    for k_factor, rerank in SWEEP:

        def fixed(v, kf=k_factor, rr=rerank):
            return idx._approximate(v, rr, kf, None)[0]

        m = measure(fixed, x, q, exact, images)
        rows.append(
            _row(n, "gallery index, fixed", f"k_factor {k_factor}, rerank {rerank}", build, per["hot"], None, m)
        )
    filt = filtered(g, q, 10)
    g.close()
    shutil.rmtree(path, ignore_errors=True)
    return rows, {"vectors": n, **filt, "calibration": info["index"].get("agreement")}


def filtered(g, q: np.ndarray, k: int) -> dict:
    """A tag filter keeping 1 % of the images: agreement with the exact filtered ranking and
    latency beside the unfiltered search, in one run."""

    tags = {"bucket": "7"}
    lat_f, lat_u, top1, top10 = [], [], [], []
    for v in q:
        t = time.perf_counter()
        g.search(v, k=k)
        lat_u.append(time.perf_counter() - t)
        t = time.perf_counter()
        f = g.search(v, k=k, tags=tags)[0]
        lat_f.append(time.perf_counter() - t)
        e = g.search(v, k=k, tags=tags, exact=True)[0]
        tie = lambda s, ref: s >= ref - TIE * max(1.0, abs(ref))  # noqa: E731
        top1.append(bool(f) and (f[0].image_id == e[0].image_id or tie(f[0].score, e[0].score)))
        ids = {h.image_id for h in e}
        top10.append(sum(h.image_id in ids or tie(h.score, e[-1].score) for h in f) / max(1, len(e)))
    fs, us = summarise_ms(lat_f), summarise_ms(lat_u)
    return {
        "filter": "1 % of images",
        "top1": round(float(np.mean(top1)), 4),
        "top10": round(float(np.mean(top10)), 4),
        "filtered_p50_ms": fs["p50_ms"],
        "filtered_p99_ms": fs["p99_ms"],
        "unfiltered_p50_ms": us["p50_ms"],
        "ratio_p50": round(fs["p50_ms"] / us["p50_ms"], 2),
    }


def exact_rows(n: int, x, q, exact, images, fetch: int) -> list[dict]:
    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    flat = faiss.IndexScalarQuantizer(x.shape[1], faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for s in range(0, len(x), 262144):
        flat.add(x[s : s + 262144].astype(np.float32))
    build = time.perf_counter() - t
    sub = q[: max(20, len(q) // 10)] if n > 2_000_000 else q  # 1.5 s a query at 10M: a tenth of them
    m = measure(lambda v: flat.search(v[None], fetch)[1][0], x, sub, exact[: len(sub)], images)
    return [_row(n, "exact scan (faiss f16)", f"{len(sub)} queries", build, x.shape[1] * 2, None, m)]


def usearch_rows(n: int, x, q, exact, images, fetch: int) -> list[dict]:
    import onnxruntime  # noqa: F401  (load ORT's libraries before usearch's: the reverse order segfaults)
    from usearch.index import Index

    t = time.perf_counter()
    idx = Index(ndim=x.shape[1], metric="ip", dtype="f16", connectivity=16, expansion_add=128)
    for s in tqdm(range(0, len(x), 100_000), desc=f"usearch HNSW {n:,}", unit="chunk", leave=False):
        idx.add(np.arange(s, min(s + 100_000, len(x))), x[s : s + 100_000], threads=2)
    build = time.perf_counter() - t
    rows = []
    for ef in HNSW_EF:
        idx.expansion_search = ef
        m = measure(lambda v: idx.search(v, fetch, threads=1).keys, x, q, exact, images)
        rows.append(_row(n, "usearch HNSW ip f16 (before)", f"ef {ef}", build, idx.memory_usage / n, None, m))
    return rows


def ivf_rows(n: int, x, q, exact, images, fetch: int) -> list[dict]:
    faiss.omp_set_num_threads(2)
    nlist = int(4 * np.sqrt(n))
    t = time.perf_counter()
    quant = faiss.IndexFlatIP(x.shape[1])
    fp16, ip = faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    idx = faiss.IndexIVFScalarQuantizer(quant, x.shape[1], nlist, fp16, ip)
    train = x[np.random.default_rng(1).permutation(len(x))[: 64 * nlist]].astype(np.float32)
    idx.train(train)
    for s in range(0, len(x), 262144):
        idx.add(x[s : s + 262144].astype(np.float32))
    build = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    rows = []
    for probe in IVF_PROBES:
        idx.nprobe = probe
        m = measure(lambda v: idx.search(v[None], fetch)[1][0], x, q, exact, images)
        rows.append(_row(n, f"faiss IVF{nlist} f16 ip", f"nprobe {probe}", build, x.shape[1] * 2 + 8, None, m))
    return rows


def run(g: EncodedGallery, sample: np.ndarray, sizes, work: Path, n_queries: int = QUERIES, seed: int = 0) -> dict:
    """Rows per tier and design, and the filtered search per tier."""
    q = g.queries[np.random.default_rng(seed).permutation(len(g.queries))[:n_queries]].astype(np.float32)
    out = {"rows": [], "filtered": [], "queries": len(q), "skipped": []}
    work.mkdir(parents=True, exist_ok=True)
    for n in sizes:
        x, images, boxes, scores = tier(g, n, seed)
        fetch = 10 * int(np.diff(np.flatnonzero(np.r_[1, np.diff(images), 1])).max())  # k x instances per image
        exact = truth(x, q, fetch)
        rows, filt = gallery_rows(len(x), x, images, boxes, scores, q, exact, sample, work)
        out["rows"] += rows
        out["filtered"].append(filt)
        out["rows"] += exact_rows(len(x), x, q, exact, images, fetch)
        if len(x) <= HNSW_MAX:
            out["rows"] += usearch_rows(len(x), x, q, exact, images, fetch)
        else:
            out["skipped"].append(f"usearch HNSW at {len(x):,}: its build takes hours on two cores")
        out["rows"] += ivf_rows(len(x), x, q, exact, images, fetch)
        del x, images, boxes, scores, exact
        gc.collect()
    return out
