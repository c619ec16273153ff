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
    codes.i8    stage-2 codes (engine/search/codes.py)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from reir.engine.fsutil import atomic_file, crc32_file
from reir.engine.search.agreement import MARGIN
from reir.engine.search.codes import Int8Codes
from reir.engine.search.query_space import QuerySpace

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
    margin: ClassVar[float] = MARGIN

    def __init__(self, space: QuerySpace, pq, codes: Int8Codes):
        self.space, self.pq, self.codes = space, pq, codes
        self._pq_on_disk = 0  # rows pq.faiss holds on disk
        self._pq_crc = 0

    @classmethod
    def train(cls, space: QuerySpace, sample: np.ndarray, rows: int) -> ProjectedIndex:
        faiss = faiss_module()
        y = space.project(sample)
        pq = faiss.IndexPQFastScan(space.dims, space.dims, 4, faiss.METRIC_INNER_PRODUCT)
        with bulk_threads():
            pq.train(np.ascontiguousarray(y))
        return cls(space, pq, Int8Codes.fit(y))

    @property
    def rows(self) -> int:
        return self.codes.rows

    def add(self, vectors: np.ndarray) -> None:
        for s in range(0, len(vectors), 65536):
            y = self.space.project(vectors[s : s + 65536])
            with bulk_threads():
                self.pq.add(np.ascontiguousarray(y))
            self.codes.add(y)

    def tidy(self, vectors) -> None:
        """Nothing to reorganise: every row is scanned."""

    @classmethod
    def schedule(cls) -> tuple[PQSetting, ...]:
        return SCHEDULE

    @classmethod
    def setting(cls, values: dict[str, int]) -> PQSetting:
        return PQSetting(int(values["k_factor"]), int(values["rerank"]))

    def candidates(
        self, queries: np.ndarray, setting: PQSetting, alive: np.ndarray, rows: np.ndarray | None
    ) -> list[np.ndarray]:
        qys = self.space.project(np.asarray(queries, np.float32))
        rerank, k_factor = setting.rerank, setting.k_factor
        if rows is None:
            return self._scan(qys, rerank, k_factor, alive)
        return [self._filtered(qy, rerank, k_factor, alive, rows) for qy in qys]

    def _filtered(self, qy: np.ndarray, rerank: int, k_factor: int, alive: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if len(rows) <= rerank:
            return rows
        if len(rows) <= rerank * k_factor or len(rows) * SELECTIVE <= self.rows:
            return self.codes.rescore(qy, rows, rerank)  # a selective filter: stage 2 over its rows only
        # a broad filter: over-fetch from the whole index in proportion, keep the allowed
        share = len(rows) / max(int(alive.sum()), 1)
        found = self._scan(qy[None], int(rerank / share) + 1, k_factor, alive)[0]
        return found[np.isin(found, rows)][:rerank]

    def _scan(self, qys: np.ndarray, rerank: int, k_factor: int, alive: np.ndarray) -> list[np.ndarray]:
        fetch = min(self.rows, rerank * k_factor)
        _, found = self.pq.search(np.ascontiguousarray(qys), fetch)
        out = []
        for qy, rows in zip(qys, found, strict=True):
            rows = rows[rows >= 0]
            out.append(self.codes.rescore(qy, rows[alive[rows]], rerank))
        return out

    # -- files ----------------------------------------------------------------------------
    def save(self, root: Path, state: dict[str, Any]) -> dict[str, Any]:
        faiss = faiss_module()
        codes_state = self.codes.save(root, fresh=not state)  # new training: the old codes are void
        total = self.pq.ntotal
        if not state or total - self._pq_on_disk > PQ_LAG * max(total, 1):
            with atomic_file(root / "pq.faiss") as tmp:
                faiss.write_index(self.pq, str(tmp))
                self._pq_crc = crc32_file(tmp)
            self._pq_on_disk = total
        return {"pq_rows": self._pq_on_disk, "pq_crc": self._pq_crc, **codes_state}

    @classmethod
    def load(cls, root: Path, state: dict[str, Any], rows: int, vectors, writable: bool, space: QuerySpace):
        faiss = faiss_module()
        codes = Int8Codes.load(root, state, rows, space.dims, writable)
        if crc32_file(root / "pq.faiss") != state["pq_crc"]:
            raise ValueError(f"{root / 'pq.faiss'}: its bytes do not match the manifest's checksum (damaged)")
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
        index = cls(space, pq, codes)
        for s in range(pq.ntotal, rows, 65536):  # rows committed since pq.faiss was last rewritten
            part = np.arange(s, min(s + 65536, rows))
            pq.add(np.ascontiguousarray(space.project(vectors(part))))
        index._pq_on_disk, index._pq_crc = on_disk, state["pq_crc"]
        return index

    def memory_bytes(self) -> int:
        return int(self.pq.ntotal * ((self.space.dims + 1) // 2) + self.codes.memory_bytes())
