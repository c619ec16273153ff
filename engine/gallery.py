"""A durable gallery: SQLite (WAL) is the source of truth, G/index/ a search cache rebuilt from it.

    G/gallery.sqlite   images (path, sha256, size, tags, added), instances (key, image, box,
                       detection score, raw f32 embedding), the query sample, meta
    G/index/           the search index (engine/gallery_index.py)
    G/writer.lock      one writer at a time (flock); readers never block

Every write is one SQLite transaction that also bumps `generation`; the index commits the
generation it reflects. Opening compares the two and catches the index up from SQLite (or
rebuilds it), so a kill at any moment loses nothing that was committed.

Search returns what the exact inner-product ranking over the stored vectors returns: the
index proposes candidates, their scores are computed exactly, and the gallery measures on
held-out sample queries how many candidates it needs for that (`info()["index"]`).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .gallery_check import check_gallery
from .gallery_db import (
    SCHEMA,
    SCHEMA_VERSION,
    GalleryError,
    GalleryLocked,
    connect,
    query_sample,
    upgrade,
    write_sample,
    writer_lock,
)
from .gallery_index import GalleryIndex
from .index_sync import catch_up, progress_bar, rebuild
from .indexer import index_images
from .records import Hit, NewImage
from .tag_index import TagIndex

__all__ = ["DTYPES", "Gallery", "GalleryError", "GalleryLocked", "Hit", "NewImage"]

DTYPES = ("f16", "f32")
COMPACT_DEAD = 0.25  # rebuild the index once this share of its rows was removed


class Gallery:
    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool):
        self.path, self.db, self.writable = path, db, writable
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self.dim = int(meta["dim"])
        self.dtype = meta["dtype"]
        self.model = meta.get("model", "")
        self.bundle = meta.get("bundle", "")  # the bundle that indexed it: the default for searching
        self._lock = threading.RLock()  # writers against readers within the process
        self._lock_fd: int | None = None
        self.index: GalleryIndex | None = None
        self.tags = TagIndex()

    # -- open / create ------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        dim: int,
        dtype: str = "f16",
        model: str = "",
        bundle: str = "",
        queries: np.ndarray | None = None,
    ) -> Gallery:
        """A new, empty gallery. `model` names the embedding space (the bundle's source hash):
        vectors from another model would be silently meaningless, so it is checked on use.
        `queries`: a sample of query vectors the search index is fitted to (the bundle's;
        without one every search scans all vectors, exact but slow on large galleries)."""
        path = Path(path)
        if dtype not in DTYPES:
            raise GalleryError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if (path / "gallery.sqlite").exists():
            raise GalleryError(f"{path}: a gallery already exists here (open it instead)")
        path.mkdir(parents=True, exist_ok=True)
        db = connect(path / "gallery.sqlite")
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
                    ("generation", "0"),
                    ("next_image", "1"),
                    ("next_key", "1"),
                    ("created", str(time.time())),
                ],
            )
            write_sample(db, queries, dim)
        g = cls(path, db, writable=True)
        g._acquire_writer()
        shutil.rmtree(path / "index", ignore_errors=True)
        g.index = GalleryIndex.create(path / "index", dim, dtype)
        g.index.save(g._generation())
        return g

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, progress: bool = True) -> Gallery:
        path = Path(path)
        dbfile = path / "gallery.sqlite"
        if not dbfile.is_file():
            if (path / "shards.json").is_file():
                raise GalleryError(f"{path}: a sharded gallery; open it with ShardedGallery or open_gallery")
            raise GalleryError(f"{path}: no gallery here (missing gallery.sqlite; create one with `reir index`)")
        try:
            db = connect(dbfile, read_only=not writable)
            db.execute("SELECT 1 FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise GalleryError(f"{dbfile}: not a readable gallery database ({e})") from None
        lock_fd = writer_lock(path) if writable else None
        try:
            upgraded = upgrade(db, dbfile, writable)
            g = cls(path, db, writable)
        except BaseException:
            db.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        g._lock_fd = lock_fd
        g.tags = TagIndex.load(db)
        g._load_index(progress, rebuild=upgraded)
        return g

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
        """One transaction: rows for every image and instance; then the index."""
        self._require_writer()
        for im in images:
            if im.detections.embeddings.shape[1:] != (self.dim,):
                shape = im.detections.embeddings.shape[1:]
                raise GalleryError(f"{im.path}: embedding dim {shape} != gallery dim {self.dim}")
        keys, owners, vectors, ids = [], [], [], []
        with self._lock:
            with self.db:
                next_image, next_key = self._meta_int("next_image"), self._meta_int("next_key")
                for im in images:
                    new = self._insert(im, next_image, next_key, time.time())
                    ids.append(next_image)
                    keys += range(next_key, next_key + new)
                    owners += [next_image] * new
                    vectors.append(np.asarray(im.detections.embeddings, np.float32))
                    next_image, next_key = next_image + 1, next_key + new
                marks = [(str(next_image), "next_image"), (str(next_key), "next_key")]
                self.db.executemany("UPDATE meta SET value = ? WHERE key = ?", marks)
                self._bump_generation()
            if keys:
                self.index.append(np.array(keys), np.array(owners), np.concatenate(vectors))
            for image_id, im in zip(ids, images, strict=True):
                self.tags.add(image_id, im.tags)
            if save_index:
                self._save_index()
        return ids

    def _insert(self, im: NewImage, image_id: int, first_key: int, now: float) -> int:
        """The image's row and its instances' (keys from first_key); how many instances."""
        self.db.execute(
            "INSERT INTO images (id, path, sha256, width, height, bytes, tags, added) VALUES (?,?,?,?,?,?,?,?)",
            (image_id, im.path, im.sha256, im.width, im.height, im.bytes, json.dumps(im.tags or {}), now),
        )
        d = im.detections
        emb = np.asarray(d.embeddings, np.float32)
        rows = [
            (first_key + j, image_id, *map(float, box), float(score), vec.tobytes())
            for j, (box, score, vec) in enumerate(zip(d.boxes, d.scores, emb, strict=True))
        ]
        self.db.executemany("INSERT INTO instances VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    def add_images(
        self, images: list, engine, tags: dict[str, str] | None = None, batch: int = 32, progress: bool = False
    ):
        """Detect and add image files (skipping ones already here by content hash); returns
        the IndexReport (added, skipped with reasons, ...). A gallery without a query sample
        takes the engine's bundle's."""
        return index_images(self, engine, [Path(p) for p in images], tags, batch, progress=progress)

    def remove_images(self, ids: list[int]) -> int:
        self._require_writer()
        with self._lock:
            with self.db:
                n = sum(self.db.execute("DELETE FROM images WHERE id = ?", (int(i),)).rowcount for i in ids)
                self._bump_generation()
            self.index.kill_images(ids)
            self._save_index()
        return n

    def query_sample(self) -> np.ndarray | None:
        return query_sample(self.db)

    def set_query_sample(self, queries: np.ndarray, progress: bool = False) -> None:
        """Replace the query vectors the index is fitted to (a bundle's sample, or a
        deployment's own query log): the index is refitted and re-checked."""
        self._require_writer()
        with self._lock:
            with self.db:
                self.db.execute("DELETE FROM query_sample")
                write_sample(self.db, queries, self.dim)
                self._bump_generation()
            self._save_index(progress)

    def save(self) -> None:
        """A commit point for the index (add() with save_index=False defers it)."""
        with self._lock:
            self._save_index()

    # -- reading ------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        per_image: bool = True,
        tags: dict[str, str] | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        """Top-k hits per query vector, ranked by the exact dot product. per_image: the best
        instance of each image only; tags: only images whose tags include all of these;
        exact: scan every vector instead of asking the index for candidates (the reference
        the index is checked against; slow on large galleries)."""
        queries = np.atleast_2d(np.asarray(queries, np.float32))
        if queries.shape[1] != self.dim:
            raise GalleryError(f"query dim {queries.shape[1]} != gallery dim {self.dim}")
        if k < 1:
            raise GalleryError(f"k must be at least 1, got {k}")
        return [self._search_one(q, k, per_image, tags, exact) for q in queries]

    def _search_one(self, q: np.ndarray, k: int, per_image: bool, tags, exact: bool) -> list[Hit]:
        with self._lock:
            rows = None
            if tags:
                rows = self.index.store.rows_of_images(self.tags.images(tags))
                if not len(rows):
                    return []
            if self.index.store.live == 0:
                return []
            found, scores = self.index.search(q, k, per_image, rows, exact)
            keys = self.index.store.keys.array[found]
        return self._hits(keys, scores)

    def _hits(self, keys: np.ndarray, scores: np.ndarray) -> list[Hit]:
        if len(keys) == 0:
            return []
        chunk = [int(x) for x in keys]
        q = (
            "SELECT i.key, i.image_id, i.x1, i.y1, i.x2, i.y2, i.score, m.path FROM instances i "
            f"JOIN images m ON m.id = i.image_id WHERE i.key IN ({','.join('?' * len(chunk))})"
        )
        rows = {r[0]: r for r in self.db.execute(q, chunk)}
        out = []
        for key, score in zip(chunk, scores, strict=True):
            r = rows.get(key)
            if r is not None:  # None: removed by another process since this one caught up
                out.append(Hit(r[1], r[7], (r[2], r[3], r[4], r[5]), float(score), key, r[6]))
        return out

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
        n_sample = self.db.execute("SELECT COUNT(*) FROM query_sample").fetchone()[0]
        files = [p for p in self.path.rglob("*") if p.is_file()]
        return {
            "path": str(self.path),
            "images": n_img,
            "instances": n_inst,
            "dim": self.dim,
            "dtype": self.dtype,
            "model": self.model,
            "generation": self._generation(),
            "query_sample": n_sample,
            "index": self.index.describe(self.path / "index"),
            "bytes_on_disk": sum(f.stat().st_size for f in files),
        }

    def check(self) -> list[str]:
        """Problems found (empty = consistent): SQLite itself, the index rows against SQLite,
        and the index's agreement with the exact scan, measured again now."""
        return check_gallery(self)

    def measure(self) -> dict | None:
        """Agreement of the index with the exact scan on held-out sample queries, measured
        now with the index's current candidate sizes (None: no index, searches are exact)."""
        with self._lock:
            return self.index.measure(self.query_sample())

    def rebuild(self, progress: bool = True) -> None:
        """Rebuild the index from the embeddings stored in SQLite."""
        with self._lock:
            self._rebuild(progress)

    # -- internals ----------------------------------------------------------------------
    def _meta_int(self, key: str) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _generation(self) -> int:
        return self._meta_int("generation")

    def _bump_generation(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _save_index(self, progress: bool = False) -> None:
        idx = self.index
        if self.writable and idx.store.rows and idx.store.live < (1 - COMPACT_DEAD) * idx.store.rows:
            self._rebuild(progress)
            return
        idx.fit(self.query_sample(), progress_bar(progress, idx.store.rows, "checking the index"))
        idx.save(self._generation())

    def _load_index(self, progress: bool, rebuild: bool) -> None:
        root = self.path / "index"
        if self.writable:
            for stray in self.path.glob("index.*"):  # a rebuild a kill interrupted
                if stray.is_dir():
                    shutil.rmtree(stray, ignore_errors=True)
        if not rebuild:
            try:
                self.index = GalleryIndex.load(root, self.dim, self.dtype, self.writable)
            except (OSError, ValueError, KeyError):
                self.index = None  # missing, unreadable or another version: SQLite has every embedding
        if self.index is None:
            self._rebuild(progress)
            return
        if self.index.manifest["generation"] != self._generation() and not self._catch_up(progress):
            self._rebuild(progress)
            return
        sample = self.query_sample()
        if self.writable:
            self._save_index(progress)
        else:
            self.index.fit(sample, progress_bar(progress, self.index.store.rows, "checking the index"))

    def _catch_up(self, progress: bool) -> bool:
        ok = catch_up(self.index, self.db, progress)
        if ok:
            self.tags = TagIndex.load(self.db)
            self.index.manifest["generation"] = self._generation()
        return ok

    def _rebuild(self, progress: bool) -> None:
        self.index = rebuild(self.db, self.path, self.dim, self.dtype, self.writable, self._generation(), progress)
        self.tags = TagIndex.load(self.db)

    def _acquire_writer(self) -> None:
        self._lock_fd = writer_lock(self.path)

    def _require_writer(self) -> None:
        if not self.writable:
            raise GalleryError(f"{self.path}: opened read-only; open with writable=True to change it")
