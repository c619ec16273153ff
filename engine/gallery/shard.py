"""One shard of a gallery: SQLite (WAL) is the source of truth, index/ a search cache rebuilt from it.

    gallery.sqlite   images (path, sha256, size, tags, added), instances (key, image, box,
                     detection score, raw f32 embedding), the query sample, meta
    index/           the search index (engine/search/index.py)
    writer.lock      one writer at a time (flock); readers never block

Every write is one SQLite transaction that also bumps `generation`; the index commits the
generation it reflects. Opening compares the two and catches the index up from SQLite (or
rebuilds it), so a kill at any moment loses nothing that was committed. A reader that
finds the index damaged scans the vectors exactly (same answers, slower) and says so in
`info()`; the next writer rebuilds it.

A reader serves the generation it caught up to. `refresh()` brings it to the latest
committed one (appends and removals, read in one SQLite snapshot), and a search whose hits
were removed meanwhile refreshes and searches again, so every answer is the exact ranking
of one committed generation, never of half a transaction.

Users open a `Gallery` (engine/gallery/gallery.py), which is one or more of these.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from reir.engine.gallery.check import check_shard
from reir.engine.gallery.database import (
    SCHEMA,
    SCHEMA_VERSION,
    GalleryError,
    connect,
    query_sample,
    snapshot,
    upgrade,
    write_sample,
    writer_lock,
)
from reir.engine.gallery.info import IndexInfo, Measurement, ShardInfo
from reir.engine.gallery.records import Hit, NewImage
from reir.engine.gallery.sync import catch_up, progress_bar, rebuild
from reir.engine.gallery.tags import TagIndex
from reir.engine.runtime.detections import Detections
from reir.engine.search.agreement import Agreement
from reir.engine.search.candidates import DEFAULT
from reir.engine.search.index import IndexDamaged, SearchIndex

DTYPES = ("f16", "f32")
COMPACT_DEAD = 0.25  # rebuild the index once this share of its rows was removed
# a reader holds the rows it caught up on in memory; past this many (and a quarter of its
# mapped rows) a refresh reopens the writer's saved files instead, whose pages are shared
TAIL_REOPEN = 100_000
log = logging.getLogger("reir")


class Shard:
    def __init__(self, path: Path, db: sqlite3.Connection, writable: bool, number: int = 0):
        self.path, self.db, self.writable, self.number = path, db, writable, number
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self.dim = int(meta["dim"])
        self.dtype = meta["dtype"]
        self.model = meta.get("model", "")
        self.bundle = meta.get("bundle", "")  # the bundle that indexed it: the default for searching
        self.kind = meta.get("candidates", DEFAULT)  # the candidate index design
        # instances below this detection score are not stored (an image keeps its best one)
        self.min_score = float(meta.get("min_score", 0.0))
        self._lock = threading.RLock()  # writers against readers within the process
        self._lock_fd: int | None = None
        self.index: SearchIndex | None = None
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
        candidates: str = DEFAULT,
        number: int = 0,
        min_score: float = 0.0,
    ) -> Shard:
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
                    ("candidates", candidates),
                    ("min_score", repr(float(min_score))),
                    ("generation", "0"),
                    ("next_image", "1"),
                    ("next_key", "1"),
                    ("created", str(time.time())),
                ],
            )
            write_sample(db, queries, dim)
        s = cls(path, db, writable=True, number=number)
        s._lock_fd = writer_lock(path)
        shutil.rmtree(path / "index", ignore_errors=True)
        s.index = SearchIndex.create(path / "index", dim, dtype, s.kind)
        s.index.save(s._generation())
        return s

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, progress: bool = True, number: int = 0) -> Shard:
        path = Path(path)
        dbfile = path / "gallery.sqlite"
        if not dbfile.is_file():
            raise GalleryError(f"{path}: no gallery here (missing gallery.sqlite; create one with `reir index`)")
        try:
            db = connect(dbfile, read_only=not writable)
            db.execute("SELECT 1 FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as e:
            raise GalleryError(f"{dbfile}: not a readable gallery database ({e})") from None
        lock_fd = None
        try:
            lock_fd = writer_lock(path) if writable else None
            upgraded = upgrade(db, dbfile, writable)
            s = cls(path, db, writable, number)
        except BaseException:
            db.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        s._lock_fd = lock_fd
        s.tags = TagIndex.load(db)
        s._load_index(progress, rebuild=upgraded)
        return s

    def close(self) -> None:
        self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing ------------------------------------------------------------------------
    def known(self, sha256s: list[str]) -> set[str]:
        """Which of these content hashes are already stored (so indexing resumes)."""
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
                images = [kept(im, self.min_score) for im in images]
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
        self._require_writer()
        with self._lock:
            with self.db:
                self.db.execute("DELETE FROM query_sample")
                write_sample(self.db, queries, self.dim)
                self._bump_generation()
            self._save_index(progress)

    def save(self) -> None:
        with self._lock:
            self._save_index()

    def rebuild(self, progress: bool = True) -> None:
        with self._lock:
            self._rebuild(progress)

    # -- reading ------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, per_image: bool, tags: dict[str, str] | None, exact: bool
    ) -> list[list[Hit]]:
        """Top-k hits per query vector (local ids), ranked by the exact dot product; the
        queries are searched together (one candidate call, one SQLite read). A hit removed
        by a writer since this reader's generation makes it refresh and search again."""
        for _ in range(3):
            with self._lock:
                rows = None
                if tags:
                    rows = self.index.store.rows_of_images(self.tags.images(tags))
                if self.index.store.live == 0 or (rows is not None and not len(rows)):
                    return [[] for _ in queries]
                found = self.index.search_many(queries, k, per_image, rows, exact)
                keys = [self.index.store.keys.array[r] for r, _ in found]
            hits, complete = self._hits(keys, [s for _, s in found])
            if complete or not self.refresh():
                return hits
        return hits

    @property
    def generation(self) -> int:
        """The committed generation this shard's searches answer from."""
        return int(self.index.manifest["generation"])

    def refresh(self) -> bool:
        """Catch a reader up with what writers committed since it opened or last refreshed;
        True when it changed. Cheap when nothing did (one SQLite read); a writer is always
        current. Searches wait while the new rows are applied, never see them half applied."""
        if self.writable or self._generation() == self.generation:
            return False
        with self._lock:
            if self._generation() == self.generation:
                return False
            store = self.index.store
            caught_up = self.index.damage is None and self._catch_up(False)
            if caught_up and store.tail.n <= max(TAIL_REOPEN, store.base.shape[0] // 4):
                self.index.fit(self.query_sample(), train=False)  # re-measures after growth
                return True
            fresh = Shard.open(self.path, False, False, self.number)
            # the old connection closes when the last search using it lets go of it
            self.db, self.index, self.tags = fresh.db, fresh.index, fresh.tags
            return True

    def _hits(self, keys: list[np.ndarray], scores: list[np.ndarray]) -> tuple[list[list[Hit]], bool]:
        """Each query's hits from its keys and scores, read from SQLite in one statement, and
        whether every key was still there (False: a writer removed some since this reader's
        generation)."""
        wanted = sorted({int(x) for ks in keys for x in ks})
        if not wanted:
            return [[] for _ in keys], True
        rows = {}
        for s in range(0, len(wanted), 30000):  # under SQLite's limit on bound parameters
            chunk = wanted[s : s + 30000]
            q = (
                "SELECT i.key, i.image_id, i.x1, i.y1, i.x2, i.y2, i.score, m.path FROM instances i "
                f"JOIN images m ON m.id = i.image_id WHERE i.key IN ({','.join('?' * len(chunk))})"
            )
            rows.update((r[0], r) for r in self.db.execute(q, chunk))
        out = []
        for ks, sc in zip(keys, scores, strict=True):
            hits = []
            for key, score in zip(ks.tolist(), sc.tolist(), strict=True):
                r = rows.get(key)
                if r is not None:
                    hits.append(Hit(r[1], r[7], (r[2], r[3], r[4], r[5]), score, key, r[6]))
            out.append(hits)
        return out, len(rows) == len(wanted)

    def stored(self, limit: int | None = None) -> Iterator[NewImage]:
        """The stored images as they were added (detections included), in id order."""
        q = "SELECT id, path, sha256, width, height, bytes, tags FROM images ORDER BY id LIMIT ?"
        for image_id, path, sha, w, h, size, tags in self.db.execute(q, (-1 if limit is None else limit,)).fetchall():
            rows = self.db.execute(
                "SELECT x1, y1, x2, y2, score, embedding FROM instances WHERE image_id = ? ORDER BY key", (image_id,)
            ).fetchall()
            boxes = np.array([r[:4] for r in rows], np.float64).reshape(-1, 4)
            emb = np.array([np.frombuffer(r[5], np.float32) for r in rows], np.float32).reshape(len(rows), self.dim)
            dets = Detections(boxes, np.array([r[4] for r in rows], np.float32), emb)
            yield NewImage(path, sha, w, h, size, dets, json.loads(tags) or None)

    def image(self, image_id: int) -> dict[str, Any] | None:
        r = self.db.execute(
            "SELECT id, path, sha256, width, height, bytes, tags, added FROM images WHERE id = ?", (image_id,)
        ).fetchone()
        if r is None:
            return None
        keys = ("id", "path", "sha256", "width", "height", "bytes", "tags", "added")
        return dict(zip(keys, r, strict=True)) | {"tags": json.loads(r[6])}

    def info(self) -> ShardInfo:
        count = lambda table: self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]  # noqa: E731
        files = [p for p in self.path.rglob("*") if p.is_file()]
        return ShardInfo(
            shard=self.number,
            path=str(self.path),
            images=count("images"),
            instances=count("instances"),
            generation=self._generation(),
            query_sample=count("query_sample"),
            bytes_on_disk=sum(f.stat().st_size for f in files),
            index=IndexInfo(**self.index.describe(self.path / "index")),
        )

    def check(self) -> list[str]:
        return check_shard(self)

    def measure(self) -> Measurement:
        with self._lock:
            m = self.index.measure(self.query_sample())
        if m is None:
            return Measurement(self.number, self.index.store.live, None, exact_because=self.index.why_exact())
        a = Agreement(m["top1"], m["top10"], m["recall10"], m["queries"])
        return Measurement(self.number, m["rows"], a, m["met"])

    # -- internals ----------------------------------------------------------------------
    def _meta_int(self, key: str) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    def _generation(self) -> int:
        return _generation(self.db)

    def _bump_generation(self) -> None:
        self.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    def _save_index(self, progress: bool = False) -> None:
        idx = self.index
        stale = idx.damage is not None or (idx.store.rows and idx.store.live < (1 - COMPACT_DEAD) * idx.store.rows)
        if self.writable and stale:
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
        why = None
        if not rebuild:
            try:
                self.index = SearchIndex.load(root, self.dim, self.dtype, self.writable, self.kind)
            except IndexDamaged as e:  # missing, unreadable or another version: SQLite has every embedding
                why = str(e)
                self._damaged(why)
        if self.index is None:
            self._rebuild(progress, why)
            return
        if self.index.manifest["generation"] != self._generation() and not self._catch_up(progress):
            self._rebuild(progress, "the index does not follow from the last one it saved")
            return
        if self.index.damage:
            self._damaged(self.index.damage)
        if self.writable:
            self._save_index(progress)  # rebuilds a damaged index
        else:
            bar = progress_bar(progress, self.index.store.rows, "checking the index")
            self.index.fit(self.query_sample(), bar, train=False)

    def _damaged(self, why: str) -> None:
        if self.writable:
            log.warning("%s; rebuilding the index from SQLite", why)
        else:
            log.warning("%s; searching by exact scan until a writer rebuilds it (`reir gallery rebuild`)", why)

    def _catch_up(self, progress: bool) -> bool:
        with snapshot(self.path / "gallery.sqlite") as db:
            ok = catch_up(self.index, db, progress)
            if ok:
                self.tags = TagIndex.load(db)
                self.index.manifest["generation"] = _generation(db)
        return ok

    def _rebuild(self, progress: bool, why: str | None = None) -> None:
        with snapshot(self.path / "gallery.sqlite") as db:
            at = _generation(db)
            self.index = rebuild(db, self.path, self.dim, self.dtype, self.kind, at, self.writable, progress)
            self.tags = TagIndex.load(db)
        if not self.writable:  # a reader holds the vectors in memory and scans them exactly
            self.index.damage = why or "no usable index files"

    def _require_writer(self) -> None:
        if not self.writable:
            raise GalleryError(f"{self.path}: opened read-only; open with writable=True to change it")


def kept(im: NewImage, min_score: float) -> NewImage:
    """The image with only its instances scoring `min_score` or more, and at least its best
    one: an image whose objects are all faint is still found by the one it has."""
    d = im.detections
    if min_score <= 0 or len(d.scores) == 0 or (d.scores >= min_score).all():
        return im
    keep = np.flatnonzero(d.scores >= min_score)
    keep = keep if len(keep) else np.array([int(np.argmax(d.scores))])
    return dataclasses.replace(im, detections=Detections(d.boxes[keep], d.scores[keep], d.embeddings[keep]))


def _generation(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
