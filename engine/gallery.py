"""A durable gallery: SQLite (WAL) is the source of truth, the usearch index a rebuildable cache.

    G/gallery.sqlite     images (path, sha256, size, tags, added), instances (key, image,
                         box, detection score, raw embedding), meta (dim, dtype, model, generation)
    G/index.usearch      the ANN index (inner product: the model scores by dot product)
    G/index.json         which SQLite generation the ANN file reflects
    G/writer.lock        one writer at a time (flock); readers never block

Every write is one SQLite transaction that also bumps `generation`. The ANN file is saved
atomically (temp + rename) at commit points with the generation it reflects. Opening
compares the two and brings a stale index up to date from SQLite (or rebuilds a missing or
unreadable one), so a kill at any moment loses nothing that was committed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .fsutil import atomic_file, write_json_atomic
from .protocol import Detections

SCHEMA_VERSION = 1
# Up to this many instance vectors a query scans them all: exact, and about as fast as the graph
# (448-d f16 on one 2-core EPYC thread: 0.07 ms at 1k vectors, 0.46 ms at 10k, 2.6 ms at 30k).
# Text queries against image-instance vectors by raw dot product are a hard case for HNSW (see
# benchmarks/results/*-indexes-*.md), so small galleries should not pay for it in recall.
EXACT_BELOW = 20_000
DTYPES = ("f32", "f16", "bf16", "i8")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL, sha256 TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL, height INTEGER NOT NULL, bytes INTEGER NOT NULL,
    tags TEXT NOT NULL DEFAULT '{}', added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    key INTEGER PRIMARY KEY, image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    x1 REAL NOT NULL, y1 REAL NOT NULL, x2 REAL NOT NULL, y2 REAL NOT NULL,
    score REAL NOT NULL, embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS instances_image ON instances(image_id);
"""


class GalleryError(RuntimeError):
    pass


class GalleryLocked(GalleryError):
    pass


@dataclass(frozen=True)
class Hit:
    image_id: int
    path: str
    box: tuple[float, float, float, float]  # xyxy, original pixels
    score: float  # dot product of query and instance embedding
    instance_key: int
    detection_score: float


@dataclass
class NewImage:
    path: str
    sha256: str
    width: int
    height: int
    bytes: int
    detections: Detections
    tags: dict[str, str] | None = None


class Gallery:
    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool):
        self.path, self.db, self.writable = path, db, writable
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self.dim = int(meta["dim"])
        self.dtype = meta["dtype"]
        self.model = meta.get("model", "")
        self.bundle = meta.get("bundle", "")  # the bundle that indexed it: the default for searching
        self.hnsw = json.loads(meta["hnsw"])
        self.exact_below = EXACT_BELOW  # per process, not stored: a search policy, not the layout
        self._lock = threading.RLock()  # usearch: serialise writers against readers (#735)
        self._lock_fd: int | None = None
        self._local = threading.local()  # one read connection per thread: WAL readers run in parallel
        self.index = None

    # -- open / create ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        dim: int,
        dtype: str = "f16",
        model: str = "",
        bundle: str = "",
        connectivity: int = 16,
        expansion_add: int = 128,
        expansion_search: int = 64,
    ) -> Gallery:
        """A new, empty gallery. `model` names the embedding space (the bundle's source hash):
        vectors from another model would be silently meaningless, so it is checked on use."""
        path = Path(path)
        if dtype not in DTYPES:
            raise GalleryError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if dtype == "i8":
            raise GalleryError("dtype i8 needs a cosine metric in usearch; CLARE scores by raw dot product")
        if (path / "gallery.sqlite").exists():
            raise GalleryError(f"{path}: a gallery already exists here (open it instead)")
        path.mkdir(parents=True, exist_ok=True)
        db = _connect(path / "gallery.sqlite")
        hnsw = {"connectivity": connectivity, "expansion_add": expansion_add, "expansion_search": expansion_search}
        with db:
            db.executescript(SCHEMA)
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", str(SCHEMA_VERSION)),
                    ("dim", str(dim)),
                    ("dtype", dtype),
                    ("model", model),
                    ("bundle", bundle),
                    ("hnsw", json.dumps(hnsw)),
                    ("generation", "0"),
                    ("created", str(time.time())),
                ],
            )
        g = cls(path, db, writable=True)
        g._acquire_writer()
        g.index = g._new_index()
        g._save_index()
        return g

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, progress: bool = True) -> Gallery:
        path = Path(path)
        dbfile = path / "gallery.sqlite"
        if not dbfile.is_file():
            raise GalleryError(f"{path}: no gallery here (missing gallery.sqlite; create one with `reir index`)")
        try:
            db = _connect(dbfile)
            schema = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise GalleryError(f"{dbfile}: not a readable gallery database ({e})") from None
        if schema is None or int(schema[0]) != SCHEMA_VERSION:
            raise GalleryError(f"{dbfile}: gallery schema {schema and schema[0]}, this reir reads {SCHEMA_VERSION}")
        g = cls(path, db, writable)
        if writable:
            g._acquire_writer()
        g._load_or_reconcile(progress)
        return g

    def _reader(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = _connect(self.path / "gallery.sqlite", read_only=True)
        return db

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------
    def known(self, sha256s: list[str]) -> set[str]:
        """Which of these content hashes are already in the gallery (so indexing resumes)."""
        rows = []
        for start in range(0, len(sha256s), 500):
            chunk = sha256s[start : start + 500]
            q = f"SELECT sha256 FROM images WHERE sha256 IN ({','.join('?' * len(chunk))})"
            rows += self.db.execute(q, chunk).fetchall()
        return {r[0] for r in rows}

    def add(self, images: list[NewImage], save_index: bool = True) -> list[int]:
        """One transaction: rows for every image and instance; then the ANN index."""
        self._require_writer()
        now = time.time()
        keys, vectors, ids = [], [], []
        with self._lock, self.db:
            for im in images:
                d = im.detections
                if d.embeddings.shape[1:] != (self.dim,):
                    raise GalleryError(f"{im.path}: embedding dim {d.embeddings.shape[1:]} != gallery dim {self.dim}")
                cur = self.db.execute(
                    "INSERT INTO images (path, sha256, width, height, bytes, tags, added) VALUES (?,?,?,?,?,?,?)",
                    (im.path, im.sha256, im.width, im.height, im.bytes, json.dumps(im.tags or {}), now),
                )
                ids.append(cur.lastrowid)
                emb = d.embeddings.astype(np.float32)
                for box, score, vec in zip(d.boxes, d.scores, emb, strict=True):
                    cur = self.db.execute(
                        "INSERT INTO instances (image_id, x1, y1, x2, y2, score, embedding) VALUES (?,?,?,?,?,?,?)",
                        (ids[-1], *map(float, box), float(score), vec.tobytes()),
                    )
                    keys.append(cur.lastrowid)
                    vectors.append(vec)
            self._bump_generation()
        with self._lock:
            if keys:
                self.index.add(np.array(keys, np.uint64), np.stack(vectors), threads=1)
            if save_index:
                self._save_index()
        return ids

    def add_images(
        self, images: list, engine, tags: dict[str, str] | None = None, batch: int = 32, progress: bool = False
    ):
        """Detect and add image files (skipping ones already here by content hash); returns
        the IndexReport (added, skipped with reasons, ...)."""
        from .indexer import index_images

        return index_images(self, engine, [Path(p) for p in images], tags, batch, progress=progress)

    def remove_images(self, ids: list[int]) -> int:
        self._require_writer()
        with self._lock, self.db:
            keys = []
            for i in ids:
                keys += [r[0] for r in self.db.execute("SELECT key FROM instances WHERE image_id = ?", (int(i),))]
            n = sum(self.db.execute("DELETE FROM images WHERE id = ?", (int(i),)).rowcount for i in ids)
            self._bump_generation()
        with self._lock:
            if keys:
                self.index.remove(np.array(keys, np.uint64))
            self._save_index()
        return n

    def save(self) -> None:
        """A commit point for the ANN file (add() with save_index=False defers it)."""
        with self._lock:
            self._save_index()

    # -- reading ------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        per_image: bool = True,
        tags: dict[str, str] | None = None,
        exact: bool | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query vector. per_image: the best instance of each image only
        (over-fetch, then deduplicate); tags: only images whose tags include all of these;
        exact: scan every vector instead of walking the graph (default: while the gallery
        holds at most `exact_below` vectors)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise GalleryError(f"query dim {queries.shape[1]} != gallery dim {self.dim}")
        return [self._search_one(q, k, per_image, tags, exact) for q in queries]

    def _search_one(self, q: np.ndarray, k: int, per_image: bool, tags, exact: bool | None) -> list[Hit]:
        with self._lock:
            total = len(self.index)
        if total == 0 or k <= 0:
            return []
        if exact is None:
            exact = total <= self.exact_below
        fetch = min(total, k * (4 if per_image or tags else 1))
        while True:
            with self._lock:
                m = self.index.search(q, fetch, threads=1, exact=exact)
            keys = np.asarray(m.keys)
            scores = 1.0 - np.asarray(m.distances, np.float64)[: len(keys)]  # usearch "ip" distance = 1 - dot
            hits = self._hits(keys, scores, per_image, tags, k)
            if len(hits) >= k or fetch >= total:
                return hits[:k]
            fetch = min(total, fetch * 4)

    def _hits(self, keys: np.ndarray, scores: np.ndarray, per_image: bool, tags, k: int) -> list[Hit]:
        if len(keys) == 0:
            return []
        rows = {}
        for start in range(0, len(keys), 500):
            chunk = [int(x) for x in keys[start : start + 500]]
            q = (
                "SELECT i.key, i.image_id, i.x1, i.y1, i.x2, i.y2, i.score, m.path, m.tags FROM instances i "
                f"JOIN images m ON m.id = i.image_id WHERE i.key IN ({','.join('?' * len(chunk))})"
            )
            rows.update({r[0]: r for r in self._reader().execute(q, chunk)})
        hits, seen = [], set()
        for key, score in zip(keys, scores, strict=True):
            r = rows.get(int(key))
            if r is None or (per_image and r[1] in seen):
                continue  # removed meanwhile, or a weaker instance of an image already listed
            if tags and any(json.loads(r[8]).get(t) != v for t, v in tags.items()):
                continue
            seen.add(r[1])
            hits.append(Hit(r[1], r[7], (r[2], r[3], r[4], r[5]), float(score), int(key), r[6]))
            if len(hits) >= k:
                break
        return hits

    def image(self, image_id: int) -> dict[str, Any] | None:
        r = self.db.execute(
            "SELECT id, path, sha256, width, height, bytes, tags, added FROM images WHERE id = ?", (image_id,)
        ).fetchone()
        if r is None:
            return None
        keys = ("id", "path", "sha256", "width", "height", "bytes", "tags", "added")
        return dict(zip(keys, r, strict=True)) | {"tags": json.loads(r[6])}

    def info(self) -> dict[str, Any]:
        n_img = self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        n_inst = self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        files = [self.path / n for n in ("gallery.sqlite", "gallery.sqlite-wal", "index.usearch")]
        return {
            "path": str(self.path),
            "images": n_img,
            "instances": n_inst,
            "dim": self.dim,
            "dtype": self.dtype,
            "model": self.model,
            "hnsw": self.hnsw,
            "generation": self._generation(),
            "ann_vectors": len(self.index),
            "bytes_on_disk": sum(f.stat().st_size for f in files if f.exists()),
        }

    def check(self) -> list[str]:
        """Problems found (empty = consistent): the ANN keys against SQLite, and SQLite itself."""
        problems = []
        ok = self.db.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            problems.append(f"{self.path / 'gallery.sqlite'}: integrity check: {ok}")
        db_keys = {r[0] for r in self.db.execute("SELECT key FROM instances")}
        with self._lock:
            ann_keys = {int(x) for x in self.index.keys} if len(self.index) else set()
        if ann_keys - db_keys:
            problems.append(f"ANN index holds {len(ann_keys - db_keys)} vector(s) with no instance row")
        if db_keys - ann_keys:
            problems.append(f"{len(db_keys - ann_keys)} instance(s) missing from the ANN index")
        orphans = self.db.execute(
            "SELECT COUNT(*) FROM instances WHERE image_id NOT IN (SELECT id FROM images)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} instance row(s) whose image is gone")
        return problems

    def rebuild(self, progress: bool = True) -> None:
        """Rebuild the ANN index from the embeddings stored in SQLite."""
        with self._lock:
            self.index = self._new_index()
            total = self.db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
            bar = tqdm(total=total, desc="rebuilding ANN index", unit="vec", disable=not progress or total == 0)
            cur = self.db.execute("SELECT key, embedding FROM instances ORDER BY key")
            while rows := cur.fetchmany(4096):
                self._add_rows(rows)
                bar.update(len(rows))
            bar.close()
            if self.writable:
                self._save_index()

    # -- internals ----------------------------------------------------------------------
    def _add_rows(self, rows: list[tuple[int, bytes]]) -> None:
        """(key, embedding blob) rows from SQLite into the ANN index."""
        keys = np.array([r[0] for r in rows], np.uint64)
        self.index.add(keys, np.stack([np.frombuffer(r[1], np.float32) for r in rows]), threads=1)

    def _new_index(self):
        Index = _usearch_index()
        return Index(ndim=self.dim, metric="ip", dtype=self.dtype, **self.hnsw)

    def _generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])

    def _bump_generation(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _save_index(self) -> None:
        with atomic_file(self.path / "index.usearch") as tmp:
            self.index.save(str(tmp))
        write_json_atomic(self.path / "index.json", {"generation": self._generation(), "vectors": len(self.index)})

    def _load_or_reconcile(self, progress: bool) -> None:
        ann, side = self.path / "index.usearch", self.path / "index.json"
        try:
            stamp = json.loads(side.read_text())
            index = self._new_index()
            index.load(str(ann))
        except (OSError, ValueError, RuntimeError):
            self.rebuild(progress)  # missing or unreadable: SQLite has every embedding
            return
        self.index = index
        if stamp.get("generation") != self._generation():
            self._catch_up(progress)

    def _catch_up(self, progress: bool) -> None:
        """Bring a stale ANN file (killed between commit and save) in line with SQLite."""
        db_keys = {r[0] for r in self.db.execute("SELECT key FROM instances")}
        ann_keys = {int(x) for x in self.index.keys} if len(self.index) else set()
        extra, missing = sorted(ann_keys - db_keys), sorted(db_keys - ann_keys)
        if extra:
            self.index.remove(np.array(extra, np.uint64))
        bar = tqdm(total=len(missing), desc="updating ANN index", unit="vec", disable=not progress or not missing)
        for start in range(0, len(missing), 4096):
            chunk = missing[start : start + 4096]
            q = f"SELECT key, embedding FROM instances WHERE key IN ({','.join('?' * len(chunk))})"
            rows = self.db.execute(q, chunk).fetchall()
            self._add_rows(rows)
            bar.update(len(rows))
        bar.close()
        if self.writable:
            self._save_index()

    def _acquire_writer(self) -> None:
        lock = self.path / "writer.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GalleryLocked(f"{self.path}: gallery is being written by pid {pid}; wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _require_writer(self) -> None:
        if not self.writable:
            raise GalleryError(f"{self.path}: opened read-only; open with writable=True to change it")


def _usearch_index():
    """usearch's Index class, imported after onnxruntime: importing onnxruntime once usearch
    (its numkong extension) is loaded segfaults (measured: onnxruntime 1.32, usearch 2.26.6,
    opening a gallery and then an engine in one process)."""
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401
    from usearch.index import Index

    return Index


def _connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db
