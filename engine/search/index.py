"""G/index/: one shard's search index, a cache of what SQLite holds.

    manifest.json        what the files commit: format and version, the SQLite generation
                         they reflect, rows, dead rows, the query space, the candidate
                         design and its state, the measured agreement (written last, atomically)
    vectors.f16|f32      every instance vector at the gallery's precision [rows, D] (append-only)
    keys.i64, images.i64 the instance key and image id of each row (append-only)
    space.npz            the query space the candidates are found in
    ...                  the candidate design's own files (engine/search/projected.py)

Appended bytes count only once the manifest commits them, so a kill mid-write leaves
files whose extra tail is ignored, never a half-written row that looks valid. Any file
that is missing, short or unreadable makes `load` raise `IndexDamaged`: the shard then
rebuilds the index from SQLite (a writer) or serves the exact scan (a reader).

A search: the candidate index proposes rows, their scores are computed exactly here, and
the best come back; the self-check (engine/search/agreement.py) picks how many candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from reir.engine.fsutil import atomic_file, crc32_file, write_json_atomic
from reir.engine.search.agreement import CHECK_QUERIES, agreement, calibrate, per_image
from reir.engine.search.candidates import DEFAULT, CandidateIndex, Setting, design
from reir.engine.search.query_space import QuerySpace
from reir.engine.search.vectors import VectorStore

FORMAT = "clare-reir/gallery-index"
VERSION = 2
TRAIN_MIN = 2000  # rows before a candidate index pays off (below, every search is a scan)
TRAIN_ROWS = 65536  # rows drawn to train a candidate index
RETRAIN = 8.0  # train again when the gallery grew by this factor since the last training
RECALIBRATE = 2.0  # re-measure agreement when the gallery grew by this factor
INDEX_GAIN = 0.8  # the index serves where its p50 is at most this share of the exact scan's


class IndexDamaged(ValueError):
    """A file of the index is missing, short, unreadable or from another version."""


def sample_digest(sample: np.ndarray | None) -> str:
    return "" if sample is None else hashlib.sha256(np.ascontiguousarray(sample, np.float32).tobytes()).hexdigest()


def split_sample(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every fourth query is held out to check the index; the rest fit the query space."""
    idx = np.arange(len(sample))
    return sample[idx % 4 != 0], sample[idx % 4 == 0][:CHECK_QUERIES]


class SearchIndex:
    def __init__(self, store: VectorStore, root: Path | None, manifest: dict, kind: str = DEFAULT):
        self.store, self.root, self.manifest = store, root, manifest
        self.kind = kind
        self.candidates_index: CandidateIndex | None = None
        self.damage: str | None = None  # why the candidate index could not be loaded

    # -- open / create --------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path | None, dim: int, dtype: str, kind: str = DEFAULT) -> SearchIndex:
        """An empty index: in files under `root` (a writer), or in memory (root None)."""
        design(kind)  # an unknown design fails here, before anything is written
        if root is None:
            return cls(VectorStore.memory(dim, dtype), None, _manifest(dim, dtype), kind)
        root.mkdir(parents=True, exist_ok=True)
        return cls(VectorStore.create(root, dim, dtype), root, _manifest(dim, dtype), kind)

    @classmethod
    def load(cls, root: Path, dim: int, dtype: str, writable: bool, kind: str = DEFAULT) -> SearchIndex:
        """The committed state of the files under `root`; IndexDamaged names what is wrong."""
        try:
            m = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
            if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
                raise IndexDamaged(f"{root / 'manifest.json'}: not an index manifest of version {VERSION}")
            if m["dim"] != dim or m["dtype"] != dtype:
                raise IndexDamaged(f"{root}: index of dim {m['dim']} {m['dtype']}, the gallery is {dim} {dtype}")
            store = VectorStore.load(root, dim, dtype, m["rows"], m["dead"], writable, m["crc"])
        except IndexDamaged:
            raise
        except Exception as e:  # whatever the damage: SQLite holds every embedding
            raise IndexDamaged(f"{root}: {_why(e)}") from None
        index = cls(store, root if writable else None, m, kind)
        index._load_candidates(root, writable)
        return index

    def _load_candidates(self, root: Path, writable: bool) -> None:
        """The candidate index the manifest commits; on damage, none (the exact scan serves)
        and the reason in `self.damage`, which a writer answers with a rebuild."""
        cand = self.manifest.get("candidates")
        if not cand:
            return
        try:
            if crc32_file(root / "space.npz") != cand["space_crc"]:
                raise IndexDamaged(f"{root / 'space.npz'}: its bytes do not match the manifest's checksum (damaged)")
            with np.load(root / "space.npz") as z:
                strength = z["strength"].astype(np.float32) if "strength" in z.files else None
                space = QuerySpace(z["basis"].astype(np.float32), float(z["energy"]), strength)
                if str(z["train_id"]) != cand["train_id"]:
                    raise IndexDamaged(f"{root / 'space.npz'}: trained for another manifest")
            cls = design(cand["kind"])
            self.kind = cand["kind"]
            self.candidates_index = cls.load(root, cand["state"], self.store.rows, self.store.vectors, writable, space)
        except Exception as e:
            self.candidates_index, self.damage = None, f"{root}: {_why(e)}"

    # -- writing --------------------------------------------------------------------------
    def append(self, keys: np.ndarray, images: np.ndarray, vectors: np.ndarray) -> None:
        self.store.append(keys, images, vectors)
        if self.candidates_index is not None:
            self.candidates_index.add(np.asarray(vectors, np.float32))

    def kill_images(self, image_ids: list[int]) -> None:
        self.store.kill(self.store.rows_of_images(np.asarray(image_ids, np.int64)))

    def fit(self, sample: np.ndarray | None, progress=None, train: bool = True) -> None:
        """Train the candidate index when there is a query sample and enough rows, and
        re-measure its agreement when it is new or the gallery has grown. `train=False`
        (a reader): use what the files hold, or nothing, and never train."""
        live = self.store.live
        if sample is None or live < TRAIN_MIN:
            if self.candidates_index is not None and sample is None:
                self.candidates_index, self.manifest["candidates"] = None, None
            return
        cand = self.manifest.get("candidates")
        if (
            cand is None
            or self.candidates_index is None
            or cand["sample"] != sample_digest(sample)
            or cand["kind"] != self.kind
            or live > RETRAIN * cand["trained_rows"]
        ):
            if not train:  # a reader: what the files hold still serves, unless fitted to another sample
                if cand is not None and cand["sample"] != sample_digest(sample):
                    self.candidates_index = None
                return
            self._train(sample)
        if train:
            self.candidates_index.tidy(self.store.vectors)
        cal = self.manifest.get("calibration")
        if cal is None or live > RECALIBRATE * cal["rows"]:
            self.manifest["calibration"] = self.calibrate(self.check_queries(sample), progress)

    def _train(self, sample: np.ndarray) -> None:
        fit_part, check = split_sample(sample)
        space = QuerySpace.fit(fit_part)
        alive = np.flatnonzero(self.store.alive.array)
        pick = np.sort(np.random.default_rng(0).choice(alive, min(len(alive), TRAIN_ROWS), replace=False))
        index = design(self.kind).train(space, self.store.vectors(pick), self.store.live)
        for s in range(0, self.store.rows, TRAIN_ROWS):
            index.add(self.store.vectors(np.arange(s, min(s + TRAIN_ROWS, self.store.rows))))
        self.candidates_index = index
        self.manifest["candidates"] = {
            "kind": self.kind,
            "sample": sample_digest(sample),
            # a query with more of its norm outside the space than this is searched exactly
            "residual_limit": round(float(max(2 * np.quantile(space.residual(check), 0.99), 0.05)), 4),
            "train_id": os.urandom(8).hex(),
            "trained_rows": self.store.live,
            "dims": space.dims,
            "energy": round(space.energy, 5),
            "state": {},  # nothing on disk yet: save() writes the design's files
        }
        self.manifest["calibration"] = None
        if self.root is not None:  # the old files are void from here: a kill now leaves a mismatch, so a rebuild
            with atomic_file(self.root / "space.npz") as tmp, open(tmp, "wb") as f:
                train_id = self.manifest["candidates"]["train_id"]
                np.savez(f, basis=space.basis, energy=space.energy, strength=space.strength, train_id=train_id)
            self.manifest["candidates"]["space_crc"] = crc32_file(self.root / "space.npz")

    def check_queries(self, sample: np.ndarray) -> np.ndarray:
        """The queries the index is checked with: the held-out quarter of the sample."""
        return split_sample(sample)[1]

    def calibrate(self, queries: np.ndarray, progress=None) -> dict:
        """Measure the index against the exact scan on held-out queries; size its candidates."""
        exact = self.store.top(queries, self._instances(10), progress=progress)
        cls = design(self.kind)
        result = calibrate(
            lambda q, setting: self._scored(q, self.candidates(q, setting)),
            exact,
            queries,
            self.store.images.array,
            cls.schedule(),
            margin=cls.margin,
        )
        result["rows"] = self.store.live
        # the exact scan, timed the same way: the index serves only where it is clearly faster
        # (INDEX_GAIN); at about the same cost the scan has no approximation to risk
        lat = []
        for q in queries[:16]:
            t = time.perf_counter()
            self.store.top(q, self._instances(10))
            lat.append(time.perf_counter() - t)
        result["exact_p50_ms"] = round(1000 * float(np.median(lat)), 3)
        result["use_exact"] = bool(result["met"] and result["p50_ms"] > INDEX_GAIN * result["exact_p50_ms"])
        return result

    def measure(self, sample: np.ndarray | None) -> dict | None:
        """Agreement now, with the calibrated candidate sizes (None: searches are exact)."""
        if sample is None or not self.uses_candidates:
            return None
        queries = self.check_queries(sample)
        exact = self.store.top(queries, self._instances(10))
        found = [self.search(q, 10 * self.store.max_per_image, False, None, False) for q in queries]
        a = agreement(found, exact, self.store.images.array)
        return {**a.as_dict(), "met": a.meets(self.manifest["calibration"]["targets"]), "rows": self.store.live}

    def move_to(self, root: Path) -> None:
        """The files were renamed to `root` (a rebuild swapped them in)."""
        self.root = root
        self.store.move_to(root)

    def save(self, generation: int) -> None:
        """Commit every row so far: fsync the appended files, then the manifest."""
        if self.root is None:
            self.manifest["generation"] = generation
            return
        self.store.sync()
        cand = self.manifest.get("candidates")
        if self.candidates_index is not None and cand is not None:
            cand["state"] = self.candidates_index.save(self.root, cand["state"])
        dead = np.flatnonzero(~self.store.alive.array)
        self.manifest.update(generation=generation, rows=self.store.rows, dead=dead.tolist(), crc=dict(self.store.crc))
        write_json_atomic(self.root / "manifest.json", self.manifest)

    # -- searching ------------------------------------------------------------------------
    @property
    def uses_candidates(self) -> bool:
        """Whether searches ask the candidate index (else every search scans all rows)."""
        cal = self.manifest.get("calibration")
        return bool(self.candidates_index is not None and cal and cal["met"] and not cal.get("use_exact"))

    def why_exact(self) -> str | None:
        """Why searches scan every row (None: they ask the candidate index)."""
        if self.uses_candidates:
            return None
        cal = self.manifest.get("calibration")
        if self.damage:
            return f"the index files are unusable ({self.damage})"
        if self.manifest.get("candidates") is None and self.store.live < TRAIN_MIN:
            return f"{self.store.live} rows: too few for a candidate index (it pays off from {TRAIN_MIN})"
        if self.manifest.get("candidates") is None or self.candidates_index is None:
            return "no query sample to fit a candidate index to"
        if cal and cal.get("use_exact"):
            return (
                f"the index is not clearly faster than the exact scan ({cal['p50_ms']} ms vs "
                f"{cal['exact_p50_ms']} ms p50; it serves from {INDEX_GAIN:.0%} of the scan's time)"
            )
        return "the candidate index missed its agreement targets at every setting"

    @property
    def setting(self) -> Setting | None:
        """The calibrated setting, grown with the gallery since it was measured."""
        cal = self.manifest.get("calibration")
        if self.candidates_index is None or not cal:
            return None
        growth = max(1.0, self.store.live / max(cal["rows"], 1))
        return design(self.kind).setting(cal["setting"]).grown(growth)

    def _instances(self, k: int) -> int:
        """Instances to rank for k images: an image holds at most `max_per_image`, so the
        exact top k x that many instances hold the best instance of each of the top k images."""
        return k * self.store.max_per_image

    def search(self, q: np.ndarray, k: int, images: bool, rows: np.ndarray | None, exact: bool):
        """(rows, exact scores) best first: k images' best instances, or k instances.
        `rows`: only these (a filter); `exact`: scan every row."""
        return self.search_many(np.asarray(q, np.float32)[None], k, images, rows, exact)[0]

    def search_many(self, queries: np.ndarray, k: int, images: bool, rows: np.ndarray | None, exact: bool) -> list:
        """`search` for each of `queries` [n, D], with one candidate call for all of them."""
        n = self._instances(k) if images else k
        out: list = [None] * len(queries)
        scan = np.ones(len(queries), bool) if exact or not self.uses_candidates else self._unlike_sample(queries)
        if scan.any():
            for i, found in zip(np.flatnonzero(scan), self.store.top(queries[scan], n, rows), strict=True):
                out[i] = found
        ask = np.flatnonzero(~scan)
        if len(ask):
            setting = self.setting.at_least(n)
            proposals = self.candidates_index.candidates(queries[ask], setting, self.store.alive.array, rows)
            for i, cand in zip(ask, proposals, strict=True):
                out[i] = self._widened(queries[i], k, images, rows, setting, cand)
        if images:
            return [per_image(r, s, self.store.images.array, k) for r, s in out]
        return [(r[:k], s[:k]) for r, s in out]

    def _unlike_sample(self, queries: np.ndarray) -> np.ndarray:
        """Queries with more of their norm outside the query space than the limit: scanned exactly."""
        return self.candidates_index.space.residual(queries) > self.manifest["candidates"]["residual_limit"]

    def _widened(self, q, k: int, images: bool, rows, setting: Setting, cand: np.ndarray):
        """The exact scores of the candidates, asking again with a wider setting while fewer
        than k were found (many removed rows, or a filter) and rows remain unseen."""
        available = self.store.live if rows is None else len(rows)
        while True:
            r, s = self._scored(q, cand)
            short = len(per_image(r, s, self.store.images.array, k)[0]) < k if images else len(r) < k
            if not short or len(r) >= available or setting.rerank >= available:
                return r, s
            setting = setting.widened()
            cand = self.candidates(q, setting, rows)

    def candidates(self, q: np.ndarray, setting: Setting, rows: np.ndarray | None = None) -> np.ndarray:
        """The candidate index's proposal for one query at `setting` (rows, best first):
        what the benchmark sweeps; `rows` restricts it to a filter's rows."""
        q = np.asarray(q, np.float32)[None]
        return self.candidates_index.candidates(q, setting, self.store.alive.array, rows)[0]

    def _scored(self, q: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.store.scores(cand, q)
        order = np.lexsort((cand, -scores))
        return cand[order], scores[order]

    # -- reporting ------------------------------------------------------------------------
    def describe(self, root: Path | None = None) -> dict:
        cand = self.manifest.get("candidates")
        cal = self.manifest.get("calibration")
        out = {
            "kind": cand["kind"] if self.uses_candidates else "exact scan",
            "rows": self.store.rows,
            "dead_rows": self.store.rows - self.store.live,
        }
        if self.damage:
            out["damage"] = self.damage
        if cand:
            out["query_space"] = {"dims": cand["dims"], "energy": cand["energy"], "trained_rows": cand["trained_rows"]}
        if cal:
            out["agreement"] = {k: cal[k] for k in ("top1", "top10", "recall10", "queries", "rows", "met")}
            out["candidates"] = dict(cal["setting"])
            out["latency_at_calibration_ms"] = {"index_p50": cal.get("p50_ms"), "exact_p50": cal.get("exact_p50_ms")}
        out["bytes_per_instance"] = self.bytes_per_instance(root)
        return out

    def bytes_per_instance(self, root: Path | None = None) -> dict:
        """What a query touches on every call (codes, keys, image ids: keep it in RAM), the
        mapped vectors (only the re-ranked rows are read per query; the exact scan and the
        self-check read them all), and the index files on disk."""
        rows = max(self.store.rows, 1)
        codes = self.candidates_index.memory_bytes() / rows if self.candidates_index is not None else 0
        out = {"hot": round(8 + 8 + 1 + codes, 1), "vectors": self.store.dim * self.store.base.dtype.itemsize}
        root = root or self.root
        if root is not None and root.is_dir():
            out["index_on_disk"] = round(sum(f.stat().st_size for f in root.iterdir() if f.is_file()) / rows, 1)
        return out


def _why(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if isinstance(e, OSError | ValueError) else f"{type(e).__name__}: {text}"


def _manifest(dim: int, dtype: str) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dim": dim,
        "dtype": dtype,
        "generation": -1,
        "rows": 0,
        "dead": [],
        "crc": {},
        "candidates": None,
        "calibration": None,
    }
