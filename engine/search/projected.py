"""`projected-pq`: candidates from compact codes of every row in the query space.

Stage 1 scans 4-bit product-quantisation codes of every row's projection, one
sub-quantiser per query direction, in faiss's SIMD fast-scan layout (IndexPQFastScan), and
keeps `k_factor x rerank` rows. Stage 2 rescores those with 8-bit codes of the same
projection and keeps `rerank`. The search index then re-ranks them exactly (stage 3).

Why not a graph: text queries are out of distribution for a graph built among instance
vectors, and raw inner product is not a metric; measured on the shipped model, an HNSW
walk (usearch, raw `ip`) finds far fewer of the true top 10 than this design at the same
cost (benchmarks/results). Stage 1 is linear in the rows: it reads about 55 bytes a row.

    pq.faiss    the trained quantiser and the fast-scan codes (rewritten whole, atomically,
                once 10 % of the rows are missing from it; the rest are re-encoded on load)
    codes.i8    stage-2 codes [rows, dims] (append-only; the manifest says how many count)
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reir.engine.fsutil import atomic_file, crc32_file
from reir.engine.search.query_space import QuerySpace
from reir.engine.search.vectors import Growable

RANGE_MARGIN = 1.25  # int8 scale: headroom over the training sample's largest magnitude
PQ_LAG = 0.1  # rewrite pq.faiss once this share of rows is missing from it
SELECTIVE = 20  # a filter keeping at most 1/SELECTIVE of the rows skips stage 1


def faiss_module():
    """faiss, imported on first use (a few hundred ms that `reir data` need not pay).

    A search runs on one thread: a query is small work, concurrency comes from serving
    threads or processes, and faiss's idle OpenMP workers spinning beside numpy's BLAS
    threads made a query 2x slower on two cores (measured). Bulk encoding raises it."""
    import faiss

    global _FAISS_READY
    if not _FAISS_READY:
        faiss.omp_set_num_threads(1)
        _FAISS_READY = True
    return faiss


_FAISS_READY = False


@contextlib.contextmanager
def bulk_threads():
    faiss = faiss_module()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(1)


@dataclass(frozen=True)
class PQSetting:
    k_factor: int  # stage 1 keeps k_factor x rerank rows
    rerank: int  # stage 2 keeps this many for the exact re-rank

    def grown(self, factor: float) -> PQSetting:
        return PQSetting(int(np.ceil(self.k_factor * factor)), self.rerank)

    def widened(self) -> PQSetting:
        return PQSetting(self.k_factor, self.rerank * 4)

    def at_least(self, rerank: int) -> PQSetting:
        return PQSetting(self.k_factor, max(self.rerank, rerank))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# Tried cheapest first: a stage-2 row costs about a tenth of a re-ranked one.
SCHEDULE = tuple(
    PQSetting(kf, rr)
    for kf, rr in sorted(
        ((kf, rr) for rr in (320, 640, 1280, 2560, 5120) for kf in (2, 4, 8, 16, 32, 64, 128)),
        key=lambda c: (c[0] * c[1] + 10 * c[1], c[1]),
    )
)


class ProjectedIndex:
    kind: ClassVar[str] = "projected-pq"

    def __init__(self, space: QuerySpace, pq, scale: np.ndarray, codes: np.ndarray):
        self.space, self.pq, self.scale = space, pq, scale
        self.codes = Growable(codes)
        self._pq_on_disk = 0  # rows pq.faiss holds on disk
        self._codes_on_disk = 0  # rows codes.i8 holds on disk
        self._codes_crc = 0  # CRC-32 of codes.i8's rows on disk
        self._pq_crc = 0

    @classmethod
    def train(cls, space: QuerySpace, sample: np.ndarray) -> ProjectedIndex:
        faiss = faiss_module()
        y = space.project(sample)
        pq = faiss.IndexPQFastScan(space.dims, space.dims, 4, faiss.METRIC_INNER_PRODUCT)
        with bulk_threads():
            pq.train(np.ascontiguousarray(y))
        scale = (np.abs(y).max(0) * RANGE_MARGIN / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        return cls(space, pq, scale, np.empty((0, space.dims), np.int8))

    @property
    def rows(self) -> int:
        return self.codes.n

    def add(self, vectors: np.ndarray) -> None:
        for s in range(0, len(vectors), 65536):
            y = self.space.project(vectors[s : s + 65536])
            with bulk_threads():
                self.pq.add(np.ascontiguousarray(y))
            self.codes.append(np.clip(np.rint(y / self.scale), -127, 127).astype(np.int8))

    @classmethod
    def schedule(cls) -> tuple[PQSetting, ...]:
        return SCHEDULE

    @classmethod
    def setting(cls, values: dict[str, int]) -> PQSetting:
        return PQSetting(int(values["k_factor"]), int(values["rerank"]))

    def candidates(self, q: np.ndarray, setting: PQSetting, alive: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        qy = self.space.project(np.asarray(q, np.float32)[None])[0]
        rerank, k_factor = setting.rerank, setting.k_factor
        if rows is None:
            return self._scan(qy, rerank, k_factor, alive)
        if len(rows) <= rerank:
            return rows
        if len(rows) <= rerank * k_factor or len(rows) * SELECTIVE <= self.rows:
            return self._rescore(qy, rows, rerank)  # a selective filter: stage 2 over its rows only
        # a broad filter: over-fetch from the whole index in proportion, keep the allowed
        share = len(rows) / max(int(alive.sum()), 1)
        found = self._scan(qy, int(rerank / share) + 1, k_factor, alive)
        return found[np.isin(found, rows)][:rerank]

    def _scan(self, qy: np.ndarray, rerank: int, k_factor: int, alive: np.ndarray) -> np.ndarray:
        fetch = min(self.rows, rerank * k_factor)
        _, found = self.pq.search(qy[None], fetch)
        rows = found[0]
        rows = rows[rows >= 0]
        return self._rescore(qy, rows[alive[rows]], rerank)

    def _rescore(self, qy: np.ndarray, rows: np.ndarray, keep: int) -> np.ndarray:
        """Stage 2: the `keep` best of `rows` by their 8-bit codes, best first."""
        if len(rows) > keep:
            # einsum, not BLAS: small products, and no BLAS threads to wake (see faiss_module)
            s = np.einsum("ij,j->i", self.codes.array[rows].astype(np.float32), qy * self.scale)
            top = np.argpartition(-s, keep - 1)[:keep]
            rows = rows[top[np.argsort(-s[top], kind="stable")]]
        return rows

    # -- files ----------------------------------------------------------------------------
    def save(self, root: Path, state: dict[str, Any]) -> dict[str, Any]:
        faiss = faiss_module()
        if not state:  # new training: the old stage-2 codes are void
            (root / "codes.i8").write_bytes(b"")
            self._codes_on_disk = self._codes_crc = 0
        new = np.ascontiguousarray(self.codes.array[self._codes_on_disk :]).tobytes()
        with open(root / "codes.i8", "r+b") as f:
            f.truncate(self._codes_on_disk * self.space.dims)
            f.seek(0, os.SEEK_END)
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        self._codes_on_disk, self._codes_crc = self.codes.n, zlib.crc32(new, self._codes_crc)
        total = self.pq.ntotal
        if not state or total - self._pq_on_disk > PQ_LAG * max(total, 1):
            with atomic_file(root / "pq.faiss") as tmp:
                faiss.write_index(self.pq, str(tmp))
                self._pq_crc = crc32_file(tmp)
            self._pq_on_disk = total
        return {
            "pq_rows": self._pq_on_disk,
            "pq_crc": self._pq_crc,
            "codes_crc": self._codes_crc,
            "scale": [float(v) for v in self.scale],
        }

    @classmethod
    def load(cls, root: Path, state: dict[str, Any], rows: int, vectors, writable: bool, space: QuerySpace):
        faiss = faiss_module()
        scale = np.asarray(state["scale"], np.float32)
        if scale.shape != (space.dims,):
            raise ValueError(f"{root}: int8 scale of {scale.shape[0]} dims for a {space.dims}-d query space")
        codes_file = root / "codes.i8"
        if codes_file.stat().st_size < rows * space.dims:
            raise ValueError(f"{codes_file}: shorter than the {rows} rows the manifest commits")
        if crc32_file(codes_file, rows * space.dims) != state["codes_crc"]:
            raise ValueError(f"{codes_file}: its bytes do not match the manifest's checksum (damaged)")
        if crc32_file(root / "pq.faiss") != state["pq_crc"]:
            raise ValueError(f"{root / 'pq.faiss'}: its bytes do not match the manifest's checksum (damaged)")
        if writable:
            os.truncate(codes_file, rows * space.dims)
        try:
            pq = faiss.read_index(str(root / "pq.faiss"))
        except RuntimeError as e:  # faiss reports damage as RuntimeError
            raise ValueError(f"{root / 'pq.faiss'}: unreadable ({str(e).splitlines()[0]})") from None
        if pq.d != space.dims or not isinstance(pq, faiss.IndexPQFastScan):
            raise ValueError(f"{root / 'pq.faiss'}: not this index's fast-scan codes")
        pq_rows = int(state["pq_rows"])
        if pq.ntotal != pq_rows or pq_rows > rows:  # written just before a kill stopped the manifest
            pq.reset()
        on_disk = pq.ntotal
        codes = np.fromfile(codes_file, np.int8, rows * space.dims).reshape(rows, space.dims)
        index = cls(space, pq, scale, codes)
        for s in range(pq.ntotal, rows, 65536):  # rows committed since pq.faiss was last rewritten
            part = np.arange(s, min(s + 65536, rows))
            pq.add(np.ascontiguousarray(space.project(vectors(part))))
        index._pq_on_disk, index._codes_on_disk = on_disk, rows
        index._codes_crc, index._pq_crc = state["codes_crc"], state["pq_crc"]
        return index

    def memory_bytes(self) -> int:
        return int(self.pq.ntotal * ((self.space.dims + 1) // 2) + self.codes.n * self.space.dims)
