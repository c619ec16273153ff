"""Keeping a shard's search index in step with SQLite, its source of truth: catch up after a
kill (or another process's writes), or rebuild from scratch."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
from tqdm import tqdm

from reir.engine.gallery.database import query_sample
from reir.engine.search.index import SearchIndex


def catch_up(index: SearchIndex, db: sqlite3.Connection, progress: bool) -> bool:
    """Apply what SQLite committed after the index's last save: drop removed instances,
    append new ones. False when the difference is not an append (the index is rebuilt)."""
    store = index.store
    db_keys = np.array([r[0] for r in db.execute("SELECT key FROM instances ORDER BY key")], np.int64)
    cached = store.keys.array
    store.kill(np.flatnonzero(np.isin(cached, db_keys, invert=True) & store.alive.array))
    last = int(cached.max()) if len(cached) else 0
    missing = np.setdiff1d(db_keys, cached, assume_unique=True)
    if len(missing) and missing.min() <= last:
        return False  # a key below the cached ones that the cache lacks: not an append
    last_image = int(store.images.array[-1]) if store.rows else 0
    bar = progress_bar(progress, len(missing), "updating index")
    cur = db.execute("SELECT key, image_id, embedding FROM instances WHERE key > ? ORDER BY image_id, key", (last,))
    while rows := cur.fetchmany(4096):
        if rows[0][1] < last_image:
            return False
        index.append(*_unpack(rows))
        last_image = rows[-1][1]
        if bar is not None:
            bar(len(rows))
    return True


def rebuild(
    db: sqlite3.Connection, path: Path, dim: int, dtype: str, kind: str, generation: int, writable: bool, progress: bool
) -> SearchIndex:
    """A fresh index from SQLite. A writer builds it beside the old one, trains it, and swaps
    it in; a reader, which may not write, holds the vectors in memory and scans them exactly
    (it never trains: that is the writer's job, `reir gallery rebuild`)."""
    new = path / f"index.new-{os.getpid()}" if writable else None
    if new is not None:
        shutil.rmtree(new, ignore_errors=True)
    idx = SearchIndex.create(new, dim, dtype, kind)
    total = db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    bar = progress_bar(progress, total, "rebuilding index" if writable else "reading vectors")
    cur = db.execute("SELECT key, image_id, embedding FROM instances ORDER BY image_id, key")
    while rows := cur.fetchmany(4096):
        idx.append(*_unpack(rows))
        if bar is not None:
            bar(len(rows))
    if new is None:
        idx.manifest["generation"] = generation
        return idx
    idx.fit(query_sample(db), progress_bar(progress, total, "checking the index"))
    idx.save(generation)
    root, old = path / "index", path / f"index.old-{os.getpid()}"
    if root.exists():
        os.replace(root, old)
    os.replace(new, root)
    shutil.rmtree(old, ignore_errors=True)
    idx.move_to(root)
    return idx


def _unpack(rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = np.array([r[0] for r in rows], np.int64)
    images = np.array([r[1] for r in rows], np.int64)
    return keys, images, np.stack([np.frombuffer(r[2], np.float32) for r in rows])


def progress_bar(progress: bool, total: int, desc: str):
    """A tqdm update callable for long work, opened on first use (None when quiet or small)."""
    if not progress or total < 200_000:
        return None
    bar = None

    def update(n: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="vec")
        bar.update(n)
        if bar.n >= bar.total:
            bar.close()

    return update
