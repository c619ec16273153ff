"""Vector indexes side by side: usearch (f32/f16/i8 HNSW) vs FAISS (flat, HNSW) vs numpy.

Vectors come from the trained model's own embedding distribution: real instance
embeddings of an encoded synthetic gallery, each drawn at random and jittered with
Gaussian noise of 10% of the per-dimension spread (no exact duplicates), then lifted
isometrically to 256-d by a random orthonormal map, so inner products (and hence the
neighbour structure and recall) are the model's while every distance costs what a 256-d
one costs. Queries are real text query vectors of the test expressions, lifted the same way.

Per index: build time (all cores), memory, single-query latency p50/p99 at k = 10 and 100
(one thread, one query at a time, as a serving request), recall@10 against exact search.
The HNSW graphs use connectivity (M) 16 and expansion_add 128; `connectivity` adds denser
graphs of usearch f16 and FAISS HNSW, named with their M ("usearch f16 M32").
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable

import numpy as np
from tqdm import tqdm

from .common import summarise_ms

DIM = 256
EF_SWEEP = (16, 32, 64, 128, 256)
CONNECTIVITY, EXPANSION_ADD = 16, 128


def model_vectors(base: np.ndarray, n: int, lift: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`n` vectors like `base` rows (jittered), mapped to lift.shape[0] dims."""
    std = base.std(0, keepdims=True)
    out = np.empty((n, lift.shape[0]), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        v = base[rng.integers(0, len(base), m)] + 0.1 * std * rng.standard_normal((m, base.shape[1]), np.float32)
        out[s : s + m] = v @ lift.T
    return out


def isometry(d_in: int, d_out: int, rng: np.random.Generator) -> np.ndarray:
    """[d_out, d_in] with orthonormal columns: x -> Q x keeps every inner product."""
    q, _ = np.linalg.qr(rng.standard_normal((d_out, d_in)))
    return q.astype(np.float32)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), np.int64)
    for s in range(0, len(q), 64):
        sc = q[s : s + 64] @ x.T
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, part, 1), axis=1)
        out[s : s + 64] = np.take_along_axis(part, order, 1)
    return out


def _recall(found: list[np.ndarray], truth: np.ndarray, k: int = 10) -> float:
    return float(
        np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth, strict=True)])
    )


def _measure(search: Callable[[np.ndarray, int], np.ndarray], q: np.ndarray, truth: np.ndarray) -> dict:
    for v in q[:5]:
        search(v, 10)
    row = {}
    found = []
    for k in (10, 100):
        lat = []
        for v in q:
            t = time.perf_counter()
            keys = search(v, k)
            lat.append(time.perf_counter() - t)
            if k == 10:
                found.append(np.asarray(keys))
        s = summarise_ms(lat)
        row[f"k{k}_p50_ms"], row[f"k{k}_p99_ms"] = s["p50_ms"], s["p99_ms"]
    row["recall@10"] = round(_recall(found, truth), 4)
    return row


# Each index kind: build(x, threads) -> index; searchers(index) -> [(expansion_search, search)]
# with search(vector, k) -> keys; memory(index) -> bytes.


def _usearch(dtype: str, connectivity: int = CONNECTIVITY):
    import onnxruntime  # noqa: F401  (load ORT's libraries before usearch's: the reverse order segfaults)
    from usearch.index import Index

    def build(x: np.ndarray, threads: int):
        idx = Index(ndim=x.shape[1], metric="ip", dtype=dtype, connectivity=connectivity, expansion_add=EXPANSION_ADD)
        for s in range(0, len(x), 50_000):
            idx.add(np.arange(s, min(s + 50_000, len(x))), x[s : s + 50_000], threads=threads)
        return idx

    def searchers(idx):
        def at(ef: int):
            def search(v, k):
                idx.expansion_search = ef
                return idx.search(v, k, threads=1).keys

            return search

        return [(ef, at(ef)) for ef in EF_SWEEP]

    return build, searchers, lambda idx: int(idx.memory_usage)


def _faiss_hnsw(connectivity: int = CONNECTIVITY):
    import faiss

    def build(x: np.ndarray, threads: int):
        faiss.omp_set_num_threads(threads)
        idx = faiss.IndexHNSWFlat(x.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = EXPANSION_ADD
        idx.add(x)
        faiss.omp_set_num_threads(1)
        return idx

    def searchers(idx):
        def at(ef: int):
            def search(v, k):
                idx.hnsw.efSearch = ef
                return idx.search(v[None], k)[1][0]

            return search

        return [(ef, at(ef)) for ef in EF_SWEEP]

    return build, searchers, lambda idx: len(faiss.serialize_index(idx))


def _faiss_flat():
    import faiss

    def build(x: np.ndarray, threads: int):
        idx = faiss.IndexFlatIP(x.shape[1])
        idx.add(x)
        faiss.omp_set_num_threads(1)
        return idx

    return build, lambda idx: [(None, lambda v, k: idx.search(v[None], k)[1][0])], lambda idx: idx.ntotal * idx.d * 4


def _numpy():
    def search_in(x):
        def search(v, k):
            sc = x @ v
            part = np.argpartition(-sc, k - 1)[:k]
            return part[np.argsort(-sc[part])]

        return [(None, search)]

    return lambda x, threads: x, search_in, lambda x: x.nbytes


def index_kinds(
    full: bool, n: int, connectivity: Iterable[int] = (CONNECTIVITY,)
) -> list[tuple[str, int | None, Callable]]:
    """(name, HNSW connectivity, factory) per index. At 1M without --full: no f32 (f16 answers
    the same question at half the memory) and no i8 (its recall already tops out at 100k)."""
    kinds: list[tuple[str, int | None, Callable]] = [
        ("numpy exact", None, _numpy),
        ("faiss IndexFlatIP", None, _faiss_flat),
        ("faiss HNSWFlat", CONNECTIVITY, _faiss_hnsw),
    ]
    kinds += [(f"usearch {d}", CONNECTIVITY, lambda d=d: _usearch(d)) for d in ("f32", "f16", "i8")]
    for m in connectivity:
        if m != CONNECTIVITY:
            kinds += [
                (f"faiss HNSWFlat M{m}", m, lambda m=m: _faiss_hnsw(m)),
                (f"usearch f16 M{m}", m, lambda m=m: _usearch("f16", m)),
            ]
    if n >= 1_000_000 and not full:
        kinds = [k for k in kinds if k[0] not in ("usearch f32", "usearch i8")]
    try:
        import faiss  # noqa: F401
    except ImportError:
        kinds = [k for k in kinds if not k[0].startswith("faiss")]
    return kinds


def run(
    base: np.ndarray,
    queries: np.ndarray,
    sizes: Iterable[int],
    full: bool = False,
    n_queries: int = 200,
    seed: int = 0,
    connectivity: Iterable[int] = (CONNECTIVITY,),
) -> list[dict]:
    """One row per (size, index, search setting)."""
    rng = np.random.default_rng(seed)
    lift = isometry(base.shape[1], DIM, rng)
    q = (queries[rng.permutation(len(queries))[:n_queries]] @ lift.T).astype(np.float32)
    threads = os.cpu_count() or 1
    rows = []
    for n in sizes:
        x = model_vectors(base, n, lift, rng)
        truth = exact_topk(x, q, 10)
        kinds = index_kinds(full, n, connectivity)
        for name, m, factory in tqdm(kinds, desc=f"indexes at {n:,}", unit="index"):
            build, searchers, memory = factory()
            t = time.perf_counter()
            idx = build(x, threads)
            build_s = time.perf_counter() - t
            for ef, search in searchers(idx):
                row = {"vectors": n, "dim": DIM, "index": name, "connectivity": m, "expansion_search": ef}
                row.update({"build_s": round(build_s, 2), "memory_MB": round(memory(idx) / 1e6, 1)})
                row.update(_measure(search, q, truth))
                rows.append(row)
            del idx
            gc.collect()
        del x
        gc.collect()
    return rows
