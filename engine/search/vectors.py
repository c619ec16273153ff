"""Every instance vector of a gallery at the gallery's precision, in row order, with its key
and image id: the ground the exact ranking stands on.

Rows are append-only. Rows [0, base) live in a memory-mapped file (readers on one host
share its pages); rows a reader caught up on since the file was written live in memory
after them. Removing an instance marks its row dead; a compaction (a rebuild) drops dead
rows. Image ids never decrease along the rows (the gallery hands out ids and keys in
increasing order and appends an image's instances together), so the rows of a set of
images are found by binary search.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from reir.engine.fsutil import crc32_file

DTYPES = {"f16": np.float16, "f32": np.float32}
CHUNK = 65536


class Growable:
    """A 1-D or 2-D numpy array that grows at its end in amortised O(1)."""

    def __init__(self, data: np.ndarray):
        self._buf, self.n = data, len(data)

    def append(self, block: np.ndarray) -> None:
        need = self.n + len(block)
        if need > len(self._buf):
            grown = np.empty((max(need, 2 * len(self._buf), 1024), *self._buf.shape[1:]), self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = block
        self.n = need

    @property
    def array(self) -> np.ndarray:
        return self._buf[: self.n]


class VectorStore:
    def __init__(self, dim: int, dtype: str, base: np.ndarray, keys: np.ndarray, images: np.ndarray, alive):
        self.dim, self.dtype = dim, dtype
        self.base = base  # [b, D] memory map (or an empty array)
        self.tail = Growable(np.empty((0, dim), DTYPES[dtype]))
        self.keys, self.images = Growable(keys), Growable(images)
        self.alive = Growable(np.asarray(alive, bool))
        self._file: Path | None = None
        self._max_per_image: int | None = None
        self._live: int | None = None
        self.crc: dict[str, int] = {}  # CRC-32 of each file's committed bytes (a writer's files)

    # -- files ----------------------------------------------------------------------------
    @classmethod
    def memory(cls, dim: int, dtype: str) -> VectorStore:
        """An empty store held in memory (a reader that found no usable files)."""
        z = np.zeros(0, np.int64)
        return cls(dim, dtype, np.empty((0, dim), DTYPES[dtype]), z, z.copy(), np.zeros(0, bool))

    @classmethod
    def create(cls, root: Path, dim: int, dtype: str) -> VectorStore:
        """An empty store whose rows go to files under `root` (the writer's)."""
        store = cls.memory(dim, dtype)
        for name in (f"vectors.{dtype}", "keys.i64", "images.i64"):
            (root / name).write_bytes(b"")
            store.crc[name] = 0
        store._file = root / f"vectors.{dtype}"
        return store

    @classmethod
    def load(
        cls, root: Path, dim: int, dtype: str, rows: int, dead: list[int], writable: bool, crc: dict[str, int]
    ) -> VectorStore:
        """The `rows` the manifest committed, checked against its CRC-32 of each file. Bytes
        past them are a write a kill cut short: a writer truncates them, a reader ignores them."""
        width = dim * np.dtype(DTYPES[dtype]).itemsize
        files = ((root / f"vectors.{dtype}", width), (root / "keys.i64", 8), (root / "images.i64", 8))
        for f, size in files:
            if f.stat().st_size < rows * size:
                raise ValueError(f"{f}: shorter than the {rows} rows the manifest commits")
            if crc32_file(f, rows * size) != crc[f.name]:
                raise ValueError(f"{f}: its bytes do not match the manifest's checksum (damaged)")
            if writable:
                os.truncate(f, rows * size)
        keys = np.fromfile(root / "keys.i64", np.int64, rows)
        images = np.fromfile(root / "images.i64", np.int64, rows)
        if rows and np.any(np.diff(images) < 0):
            raise ValueError(f"{root}: image ids out of order")
        alive = np.ones(rows, bool)
        alive[np.asarray(dead, np.int64)] = False
        store = cls(dim, dtype, np.empty((0, dim), DTYPES[dtype]), keys, images, alive)
        store._file = files[0][0]
        store._remap()
        if writable:
            store.crc = {f.name: crc[f.name] for f, _ in files}
        else:
            store._file = None
        return store

    def move_to(self, root: Path) -> None:
        if self._file is not None:
            self._file = root / self._file.name
            self._remap()

    def sync(self) -> None:
        """fsync the appended rows: called before a manifest commits them."""
        if self._file is None:
            return
        for name in (self._file.name, "keys.i64", "images.i64"):
            fd = os.open(self._file.parent / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remap(self) -> None:
        rows = self.keys.n
        self.base = (  # a plain ndarray over the map: indexing a memmap subclass costs more per call
            np.asarray(np.memmap(self._file, DTYPES[self.dtype], "r", shape=(rows, self.dim)))
            if rows
            else np.empty((0, self.dim), DTYPES[self.dtype])
        )

    # -- rows -----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.keys.n

    @property
    def live(self) -> int:
        if self._live is None:
            self._live = int(self.alive.array.sum())
        return self._live

    def append(self, keys: np.ndarray, images: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        if self.rows and images[0] < self.images.array[-1]:
            raise ValueError("image ids must not decrease along the rows")
        block = np.asarray(vectors, DTYPES[self.dtype])
        if self._file is not None:
            parts = (
                (self._file.name, np.ascontiguousarray(block)),
                ("keys.i64", np.asarray(keys, np.int64)),
                ("images.i64", np.asarray(images, np.int64)),
            )
            for name, arr in parts:
                data = arr.tobytes()
                with open(self._file.parent / name, "ab") as f:
                    f.write(data)
                self.crc[name] = zlib.crc32(data, self.crc[name])
        else:
            self.tail.append(block)
        if self._max_per_image is not None:
            joined = images if not self.rows or images[0] != self.images.array[-1] else None
            run = _longest_run(np.asarray(images)) if joined is not None else None
            self._max_per_image = max(self._max_per_image, run) if run is not None else None
        self.keys.append(np.asarray(keys, np.int64))
        self.images.append(np.asarray(images, np.int64))
        self.alive.append(np.ones(len(keys), bool))
        self._live = None
        if self._file is not None:
            self._remap()

    def kill(self, rows: np.ndarray) -> None:
        self.alive.array[rows] = False
        self._live = None

    def rows_of_images(self, image_ids: np.ndarray) -> np.ndarray:
        """Live rows of these images, ascending."""
        imgs = self.images.array
        ids = np.unique(np.asarray(image_ids, np.int64))
        lo, hi = np.searchsorted(imgs, ids, "left"), np.searchsorted(imgs, ids, "right")
        keep = hi > lo
        if not keep.any():
            return np.zeros(0, np.int64)
        lo, hi = lo[keep], hi[keep]
        rows = np.repeat(hi - np.cumsum(hi - lo), hi - lo) + np.arange(int((hi - lo).sum()))
        return rows[self.alive.array[rows]]

    def vectors(self, rows: np.ndarray, raw: bool = False) -> np.ndarray:
        """[n, D] float32 (or the stored dtype with `raw`), for any rows in any order."""
        if isinstance(rows, slice):
            return self._slice(rows, raw)
        rows = np.asarray(rows, np.int64)
        b = self.base.shape[0]
        if rows.size and rows.max() < b:
            out = self.base[rows]
        else:
            out = np.empty((len(rows), self.dim), DTYPES[self.dtype])
            low = rows < b
            out[low] = self.base[rows[low]]
            out[~low] = self.tail.array[rows[~low] - b]
        return out if raw else out.astype(np.float32)

    def _slice(self, rows: slice, raw: bool) -> np.ndarray:
        b = self.base.shape[0]
        start, stop = rows.start, rows.stop
        if stop <= b:
            out = np.asarray(self.base[start:stop])
        elif start >= b:
            out = self.tail.array[start - b : stop - b]
        else:
            out = np.concatenate([self.base[start:b], self.tail.array[: stop - b]])
        return out if raw else out.astype(np.float32)

    def scores(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        """The exact score of each row: the one definition every search path ranks by
        (einsum: the re-ranked sets are small, and BLAS would wake its threads for each)."""
        return np.einsum("ij,j->i", self.vectors(rows), np.asarray(q, np.float32))

    @property
    def max_per_image(self) -> int:
        """The most rows any image holds (the detector's top-K, at most); kept up to date."""
        if self._max_per_image is None:
            self._max_per_image = _longest_run(self.images.array)
        return self._max_per_image

    def top(self, queries: np.ndarray, n: int, rows: np.ndarray | None = None, progress=None) -> list:
        """Exact top-`n` live rows per query, over `rows` (default: all): [(rows, scores)],
        best first, ties by row. Scanned in chunks, so memory stays flat at any size."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        best = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in queries]
        total = self.rows if rows is None else len(rows)
        alive = self.alive.array
        scan = _FusedScan(self) if rows is None and len(queries) == 1 else None
        for s in range(0, total, CHUNK):
            if scan is not None:  # one query over everything: faiss's SIMD f16 scan, no f32 copy
                part, sc = scan.top(queries[0], s, min(s + CHUNK, total), n)
                sc = sc[None]
            else:
                if rows is None:
                    part = np.arange(s, min(s + CHUNK, total))
                    part = part[alive[s : s + CHUNK]]
                else:
                    part = np.asarray(rows[s : s + CHUNK])
                    part = part[alive[part]]
                v = self.vectors(part)
                sc = np.atleast_2d(v @ queries[0] if len(queries) == 1 else queries @ v.T)
            for i, row in enumerate(sc):
                r, x = np.concatenate([best[i][0], part]), np.concatenate([best[i][1], row])
                if len(x) > n:
                    keep = np.argpartition(-x, n - 1)[:n]
                    r, x = r[keep], x[keep]
                best[i] = (r, x)
            if progress is not None:
                progress(min(CHUNK, total - s))
        if scan is not None:  # the same arithmetic as every other path, for the rows kept
            best = [(r, self.scores(r, queries[0])) for r, _ in best]
        out = []
        for r, x in best:
            order = np.lexsort((r, -x))
            out.append((r[order], x[order]))
        return out


def _longest_run(values: np.ndarray) -> int:
    if not len(values):
        return 1
    edges = np.flatnonzero(np.diff(values)) + 1
    return int(np.diff(np.concatenate([[0], edges, [len(values)]])).max())


class _FusedScan:
    """Top rows of one query over row ranges, by faiss's fused f16 decode-and-dot (a scan
    that never writes the f32 vectors out: about 4x numpy's cast-then-dot here)."""

    def __init__(self, store: VectorStore):
        import faiss  # start-up: only for a full scan

        self.store, self.faiss = store, faiss
        self.index = faiss.IndexScalarQuantizer(store.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        self.f32 = store.dtype == "f32"

    def top(self, q: np.ndarray, start: int, stop: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        alive = self.store.alive.array[start:stop]
        if self.f32:  # no f16 decode to save: plain BLAS
            v = self.store.vectors(slice(start, stop))
            sc = v @ q
            rows = np.arange(start, stop)
            return rows[alive], sc[alive]
        raw = np.ascontiguousarray(self.store.vectors(slice(start, stop), raw=True))
        self.index.reset()
        self.faiss.copy_array_to_vector(raw.view(np.uint8).ravel(), self.index.codes)
        self.index.ntotal = stop - start
        want = min(stop - start, n + int((~alive).sum()))
        d, i = self.index.search(q[None], want)
        i, d = i[0], d[0]
        keep = (i >= 0) & alive[np.maximum(i, 0)]
        return i[keep] + start, d[keep]
