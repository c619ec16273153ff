"""G/index/: a gallery's search cache. SQLite holds the truth; everything here can be rebuilt
from it, and is, whenever it is missing, unreadable, stale beyond catching up, or written
by another version.

    manifest.json        what the files commit: format and version, the SQLite generation
                         they reflect, rows, dead rows, the query sample they were fitted
                         to, the measured agreement (written last, atomically)
    vectors.f16|f32      every instance vector at the gallery's precision [rows, D] (append-only)
    keys.i64, images.i64 the instance key and image id of each row (append-only)
    space.npz, pq.faiss  the query space and the stage-1 fast-scan codes
    codes.i8             stage-2 codes (append-only)

Appended bytes count only once the manifest commits them, so a kill mid-write leaves
files whose extra tail is ignored, never a half-written row that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np

from .fsutil import write_json_atomic
from .projected_index import ProjectedIndex
from .query_space import QuerySpace
from .self_check import CHECK_QUERIES, agreement, calibrate, per_image
from .vector_store import VectorStore

FORMAT = "clare-reir/gallery-index"
VERSION = 1
TRAIN_MIN = 2000  # rows before the projected index pays off (below, every search is a scan)
PQ_LAG = 0.1  # rewrite pq.faiss once this share of rows is missing from it
RECALIBRATE = 2.0  # re-measure agreement when the gallery grew by this factor


def sample_digest(sample: np.ndarray | None) -> str:
    return "" if sample is None else hashlib.sha256(np.ascontiguousarray(sample, np.float32).tobytes()).hexdigest()


def split_sample(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every fourth query is held out to check the index; the rest fit the query space."""
    idx = np.arange(len(sample))
    return sample[idx % 4 != 0], sample[idx % 4 == 0][:CHECK_QUERIES]


class GalleryIndex:
    def __init__(self, store: VectorStore, root: Path | None, manifest: dict):
        self.store, self.root, self.manifest = store, root, manifest
        self.projected: ProjectedIndex | None = None
        self._pq_rows = 0  # rows pq.faiss holds on disk
        self._codes_rows = 0  # rows codes.i8 holds on disk

    # -- open / create --------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | None, dim: int, dtype: str) -> GalleryIndex:
        """An empty index: in files under `root` (a writer), or in memory (root None)."""
        if root is None:
            return cls(VectorStore.memory(dim, dtype), None, _manifest(dim, dtype))
        root.mkdir(parents=True, exist_ok=True)
        return cls(VectorStore.create(root, dim, dtype), root, _manifest(dim, dtype))

    @classmethod
    def load(cls, root: Path, dim: int, dtype: str, writable: bool) -> GalleryIndex:
        """The committed state of the files under `root`; ValueError/OSError if unusable."""
        m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise ValueError(f"{root}: index format {m.get('format')} v{m.get('version')}, this reir writes v{VERSION}")
        if m["dim"] != dim or m["dtype"] != dtype:
            raise ValueError(f"{root}: index of dim {m['dim']} {m['dtype']}, the gallery is {dim} {dtype}")
        store = VectorStore.load(root, dim, dtype, m["rows"], m["dead"], writable)
        index = cls(store, root if writable else None, m)
        if m.get("projected"):
            index.projected = ProjectedIndex.load(root, m["rows"], store.vectors, m["projected"]["train_id"], writable)
            index._pq_rows, index._codes_rows = m["projected"]["pq_rows"], m["rows"]
        return index

    # -- writing --------------------------------------------------------------------------
    def append(self, keys: np.ndarray, images: np.ndarray, vectors: np.ndarray) -> None:
        self.store.append(keys, images, vectors)
        if self.projected is not None:
            self.projected.add(np.asarray(vectors, np.float32))

    def kill_images(self, image_ids: list[int]) -> None:
        self.store.kill(self.store.rows_of_images(np.asarray(image_ids, np.int64)))

    def fit(self, sample: np.ndarray | None, progress=None) -> None:
        """Train the projected index when there is a query sample and enough rows, and
        re-measure its agreement when it is new or the gallery has grown."""
        digest = sample_digest(sample)
        live = self.store.live
        if sample is None or live < TRAIN_MIN:
            if self.projected is not None and sample is None:
                self.projected, self.manifest["projected"] = None, None
            return
        proj = self.manifest.get("projected")
        if proj is None or proj["sample"] != digest or live > 8 * proj["trained_rows"]:
            fit_part, _ = split_sample(sample)
            space = QuerySpace.fit(fit_part)
            alive = np.flatnonzero(self.store.alive.array)
            pick = np.sort(np.random.default_rng(0).choice(alive, min(len(alive), 65536), replace=False))
            self.projected = ProjectedIndex.train(space, self.store.vectors(pick))
            for s in range(0, self.store.rows, 65536):
                self.projected.add(self.store.vectors(np.arange(s, min(s + 65536, self.store.rows))))
            check = split_sample(sample)[1]
            self.manifest["projected"] = {
                "sample": digest,
                # a query with more of its norm outside the space than this is searched exactly
                "residual_limit": round(float(max(2 * np.quantile(space.residual(check), 0.99), 0.05)), 4),
                "train_id": self.projected.train_id,
                "trained_rows": live,
                "dims": space.dims,
                "energy": round(space.energy, 5),
                "pq_rows": 0,
            }
            self.manifest["calibration"] = None
            self._pq_rows = self._codes_rows = 0
            if self.root is not None:  # the old files are void from here: a kill now leaves a mismatch, so a rebuild
                (self.root / "codes.i8").write_bytes(b"")
                self.projected.save_quantizers(self.root)
                self._pq_rows = self.projected.pq.ntotal
        cal = self.manifest.get("calibration")
        if cal is None or live > RECALIBRATE * cal["rows"]:
            self.manifest["calibration"] = self.calibrate(split_sample(sample)[1], progress)

    def calibrate(self, queries: np.ndarray, progress=None) -> dict:
        """Measure the index against the exact scan on held-out queries; size its candidates."""
        exact = self.store.top(queries, self._instances(10), progress=progress)
        result = calibrate(
            lambda q, rerank, kf: self._approximate(q, rerank, kf, None), exact, queries, self.store.images.array
        )
        result["rows"] = self.store.live
        # the exact scan, timed the same way: where it is the faster of the two, it serves
        lat = []
        for q in queries[:16]:
            t = time.perf_counter()
            self.store.top(q, self._instances(10))
            lat.append(time.perf_counter() - t)
        result["exact_p50_ms"] = round(1000 * float(np.median(lat)), 3)
        result["use_exact"] = bool(result["met"] and result["exact_p50_ms"] < result["p50_ms"])
        return result

    def measure(self, sample: np.ndarray | None) -> dict | None:
        """Agreement now, with the calibrated candidate sizes (None: no projected index)."""
        cal = self.manifest.get("calibration")
        if sample is None or self.projected is None or cal is None:
            return None
        queries = split_sample(sample)[1]
        exact = self.store.top(queries, self._instances(10))
        found = [self.search(q, 10 * self.store.max_per_image, False, None, False) for q in queries]
        a = agreement(found, exact, self.store.images.array)
        return {**a.as_dict(), "met": a.meets(cal["targets"]), "rows": self.store.live}

    def move_to(self, root: Path) -> None:
        """The files were renamed to `root` (a rebuild swapped them in)."""
        self.root = root
        self.store.move_to(root)

    def save(self, generation: int, force_pq: bool = False) -> None:
        """Commit every row so far: fsync the appended files, then the manifest."""
        if self.root is None:
            self.manifest["generation"] = generation
            return
        self.store.sync()
        proj = self.manifest.get("projected")
        if self.projected is not None and proj is not None:
            self._codes_rows = self.projected.save_codes(self.root, self._codes_rows)
            if force_pq or self.projected.pq.ntotal - self._pq_rows > PQ_LAG * max(self.projected.pq.ntotal, 1):
                self.projected.save_quantizers(self.root)
                self._pq_rows = self.projected.pq.ntotal
            proj["pq_rows"] = self._pq_rows
        dead = np.flatnonzero(~self.store.alive.array)
        self.manifest.update(generation=generation, rows=self.store.rows, dead=dead.tolist())
        write_json_atomic(self.root / "manifest.json", self.manifest)

    # -- searching ------------------------------------------------------------------------
    def _instances(self, k: int) -> int:
        """Instances to rank for k images: an image holds at most `max_per_image`, so the
        exact top k x that many instances hold the best instance of each of the top k images."""
        return k * self.store.max_per_image

    def search(self, q: np.ndarray, k: int, images: bool, rows: np.ndarray | None, exact: bool):
        """(rows, exact scores) best first: k images' best instances, or k instances.
        `rows`: only these (a filter)."""
        n = self._instances(k) if images else k
        cal = self.manifest.get("calibration")
        if not exact and self.projected is not None:
            exact = self.projected.space.residual(q)[0] > self.manifest["projected"]["residual_limit"]
        if exact or self.projected is None or cal is None or not cal["met"] or cal.get("use_exact"):
            r, s = self.store.top(q, n, rows)[0]
        else:
            growth = max(1.0, self.store.live / max(cal["rows"], 1))
            k_factor = int(np.ceil(cal["k_factor"] * growth))
            rerank = max(cal["rerank"], n)
            available = self.store.live if rows is None else len(rows)
            while True:
                r, s = self._approximate(q, rerank, k_factor, rows)
                short = len(per_image(r, s, self.store.images.array, k)[0]) < k if images else len(r) < k
                if not short or len(r) >= available or rerank >= available:
                    break
                rerank *= 4  # many removed rows, or a filter: widen until k are found or all are seen
        if images:
            return per_image(r, s, self.store.images.array, k)
        return r[:k], s[:k]

    def _approximate(self, q: np.ndarray, rerank: int, k_factor: int, rows: np.ndarray | None):
        """Candidates from the projected index, re-ranked exactly."""
        alive = self.store.alive.array
        if rows is None:
            cand = self.projected.candidates(q, rerank, k_factor, alive)
        elif len(rows) <= rerank:
            cand = rows
        elif len(rows) <= rerank * k_factor or len(rows) * 20 <= self.store.rows:
            cand = self.projected.subset(q, rows, rerank)  # selective filter: stage 2 over its rows only
        else:  # a broad filter: over-fetch from the whole index in proportion, keep the allowed
            share = len(rows) / max(self.store.live, 1)
            cand = self.projected.candidates(q, int(rerank / share) + 1, k_factor, alive)
            cand = cand[np.isin(cand, rows)][:rerank]
        scores = self.store.scores(cand, q)
        order = np.lexsort((cand, -scores))
        return cand[order], scores[order]

    # -- reporting ------------------------------------------------------------------------
    def describe(self, root: Path | None = None) -> dict:
        proj = self.manifest.get("projected")
        cal = self.manifest.get("calibration")
        out = {
            "kind": "projected"
            if self.projected is not None and cal and cal["met"] and not cal.get("use_exact")
            else "exact scan",
            "rows": self.store.rows,
            "dead_rows": self.store.rows - self.store.live,
        }
        if proj:
            out["query_space"] = {"dims": proj["dims"], "energy": proj["energy"], "trained_rows": proj["trained_rows"]}
        if cal:
            out["agreement"] = {k: cal[k] for k in ("top1", "top10", "recall10", "queries", "rows", "met")}
            out["candidates"] = {"k_factor": cal["k_factor"], "rerank": cal["rerank"]}
            out["latency_at_calibration_ms"] = {"index_p50": cal.get("p50_ms"), "exact_p50": cal.get("exact_p50_ms")}
        out["bytes_per_instance"] = self.bytes_per_instance(root)
        return out

    def bytes_per_instance(self, root: Path | None = None) -> dict:
        """What a query touches on every call (codes, keys, image ids: keep it in RAM), the
        mapped vectors (only the re-ranked rows are read per query; the exact scan and the
        self-check read them all), and the index files on disk."""
        rows = max(self.store.rows, 1)
        hot = 8 + 8 + 1 + (self.projected.memory_bytes() / rows if self.projected is not None else 0)
        out = {"hot": round(hot, 1), "vectors": self.store.dim * self.store.base.dtype.itemsize}
        root = root or self.root
        if root is not None and root.is_dir():
            out["index_on_disk"] = round(sum(f.stat().st_size for f in root.iterdir() if f.is_file()) / rows, 1)
        return out

    def remove_files(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _manifest(dim: int, dtype: str) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dim": dim,
        "dtype": dtype,
        "generation": -1,
        "rows": 0,
        "dead": [],
        "projected": None,
        "calibration": None,
    }
