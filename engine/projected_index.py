"""Candidates for a query, found in the query space (engine/query_space.py).

Stage 1 scans compact codes of every row: 4-bit product-quantisation codes, one
sub-quantiser per query direction, in faiss's SIMD fast-scan layout (IndexPQFastScan), and
keeps `k_factor x rerank` rows. Stage 2 rescores those with 8-bit codes of the same
projection and keeps `rerank`. The gallery then re-ranks them exactly (stage 3), so the
returned scores are exact and only the candidate set is approximate; its size is what the
gallery's self-check calibrates.

Why not a graph: text queries are out of distribution for a graph built among instance
vectors, and raw inner product is not a metric; measured on the shipped model, an HNSW
walk (usearch, raw `ip`) finds a fifth of the true top 10 at 250k instances
(benchmarks/results). A scan of 64-byte codes costs about 1 ms per million rows on one core.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .fsutil import atomic_file
from .query_space import QuerySpace
from .vector_store import Growable

TRAIN_ROWS = 65536  # rows drawn to train the codes
RANGE_MARGIN = 1.25  # int8 scale: headroom over the training sample's largest magnitude


def _faiss():
    """faiss, imported on first use (it costs a few hundred ms that `reir data` need not pay).

    A search runs on one thread: a query is small work, concurrency comes from serving
    threads or processes, and faiss's idle OpenMP workers spinning beside numpy's BLAS
    threads made a query 2x slower on two cores (measured). Bulk encoding raises it."""
    import faiss  # a few hundred ms at start-up that `reir data` need not pay

    global _FAISS_READY
    if not _FAISS_READY:
        faiss.omp_set_num_threads(1)
        _FAISS_READY = True
    return faiss


_FAISS_READY = False


@contextlib.contextmanager
def _bulk_threads():
    faiss = _faiss()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(1)


class ProjectedIndex:
    def __init__(self, space: QuerySpace, pq, scale: np.ndarray, codes: np.ndarray, train_id: str):
        self.space, self.pq, self.scale = space, pq, scale
        self.codes = Growable(codes)
        self.train_id = train_id  # ties the trained files to the manifest that commits them

    @classmethod
    def train(cls, space: QuerySpace, sample: np.ndarray) -> ProjectedIndex:
        """Codes fitted to `sample` ([n, D] gallery vectors, a few thousand suffice)."""
        faiss = _faiss()
        y = space.project(sample)
        pq = faiss.IndexPQFastScan(space.dims, space.dims, 4, faiss.METRIC_INNER_PRODUCT)
        with _bulk_threads():
            pq.train(np.ascontiguousarray(y))
        scale = (np.abs(y).max(0) * RANGE_MARGIN / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        return cls(space, pq, scale, np.empty((0, space.dims), np.int8), os.urandom(8).hex())

    @property
    def rows(self) -> int:
        return self.codes.n

    def add(self, vectors: np.ndarray) -> None:
        """Codes for the next rows ([n, D], in row order)."""
        for s in range(0, len(vectors), 65536):
            y = self.space.project(vectors[s : s + 65536])
            with _bulk_threads():
                self.pq.add(np.ascontiguousarray(y))
            self.codes.append(np.clip(np.rint(y / self.scale), -127, 127).astype(np.int8))

    def candidates(self, q: np.ndarray, rerank: int, k_factor: int, alive: np.ndarray) -> np.ndarray:
        """About `rerank` live rows most likely to hold the exact top, best first."""
        qy = self.space.project(np.asarray(q, np.float32)[None])
        fetch = min(self.rows, rerank * k_factor)
        _, found = self.pq.search(qy, fetch)
        rows = found[0]
        rows = rows[rows >= 0]
        return self.rescore(qy[0], rows[alive[rows]], rerank)

    def rescore(self, qy: np.ndarray, rows: np.ndarray, keep: int) -> np.ndarray:
        """Stage 2: the `keep` best of `rows` by their 8-bit codes, best first."""
        if len(rows) > keep:
            # einsum, not BLAS: small products, and no BLAS threads to wake (see _faiss)
            s = np.einsum("ij,j->i", self.codes.array[rows].astype(np.float32), qy * self.scale)
            top = np.argpartition(-s, keep - 1)[:keep]
            rows = rows[top[np.argsort(-s[top], kind="stable")]]
        return rows

    def subset(self, q: np.ndarray, rows: np.ndarray, keep: int) -> np.ndarray:
        """Stage 2 over given rows only (a selective filter): no stage-1 scan at all."""
        qy = self.space.project(np.asarray(q, np.float32)[None])[0]
        return self.rescore(qy, rows, keep)

    # -- files ----------------------------------------------------------------------------
    def save_codes(self, root: Path, on_disk: int) -> int:
        """Append the int8 codes of rows past `on_disk` to root/codes.i8 (fsynced); the rows it holds."""
        with open(root / "codes.i8", "r+b") as f:
            f.truncate(on_disk * self.space.dims)
            f.seek(0, os.SEEK_END)
            f.write(np.ascontiguousarray(self.codes.array[on_disk:]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        return self.codes.n

    def save_quantizers(self, root: Path) -> None:
        """The trained parts and the fast-scan codes (rewritten whole; atomic)."""
        faiss = _faiss()
        with atomic_file(root / "space.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, basis=self.space.basis, energy=self.space.energy, scale=self.scale, train_id=self.train_id)
        with atomic_file(root / "pq.faiss") as tmp:
            faiss.write_index(self.pq, str(tmp))

    @classmethod
    def load(cls, root: Path, rows: int, vectors, train_id: str, writable: bool) -> ProjectedIndex:
        """The index over the first `rows` rows. The fast-scan file may cover fewer (it is
        rewritten only now and then); the rest are encoded again from `vectors(rows)`."""
        faiss = _faiss()
        with np.load(root / "space.npz") as z:
            space = QuerySpace(z["basis"].astype(np.float32), float(z["energy"]))
            scale = z["scale"].astype(np.float32)
            if str(z["train_id"]) != train_id:
                raise ValueError(f"{root / 'space.npz'}: trained for another manifest")
        if writable:
            os.truncate(root / "codes.i8", max(0, min((root / "codes.i8").stat().st_size, rows * space.dims)))
        pq = faiss.read_index(str(root / "pq.faiss"))
        if pq.ntotal > rows:  # written just before a kill stopped the manifest: encode its rows again
            pq.reset()
        if (root / "codes.i8").stat().st_size < rows * space.dims:
            raise ValueError(f"{root / 'codes.i8'}: shorter than the {rows} rows the manifest commits")
        codes = np.fromfile(root / "codes.i8", np.int8, rows * space.dims).reshape(rows, space.dims)
        index = cls(space, pq, scale, codes, train_id)
        for s in range(pq.ntotal, rows, 65536):
            part = np.arange(s, min(s + 65536, rows))
            pq.add(np.ascontiguousarray(space.project(vectors(part))))
        return index

    def memory_bytes(self) -> int:
        return int(self.pq.ntotal * ((self.space.dims + 1) // 2) + self.codes.n * self.space.dims)
