"""The gallery's SQLite file: schema, versions and connections. It is the source of truth;
everything else in a gallery directory is derived from it.

Schema 2 (this version) adds the query sample (the query vectors the search index is
fitted to and checked against) and high-water marks for image ids and instance keys, so a
number is never handed out twice and a cached row can never be mistaken for a later
instance that took its number. A schema-1 gallery is upgraded in place when opened for
writing (one transaction) and its index rebuilt; opened read-only it is refused with the
command that upgrades it, never read with the wrong layout.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from reir.engine.errors import ReirError

SCHEMA_VERSION = 2
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
CREATE TABLE IF NOT EXISTS query_sample (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
"""


class GalleryError(ReirError):
    """A gallery that cannot be used as asked; the message names its path."""


class GalleryLocked(GalleryError):
    pass


def connect(path: Path, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    return db


@contextmanager
def snapshot(dbfile: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection inside one read transaction: every statement sees the same
    committed state, so an index caught up through it reflects one generation, never half
    of a writer's transaction. Its own connection: the shard's stays free for searches."""
    db = connect(dbfile, read_only=True)
    try:
        db.execute("BEGIN")
        yield db
    finally:
        db.close()  # ends the read transaction


def schema_of(db: sqlite3.Connection, dbfile: Path) -> int:
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError as e:
        raise GalleryError(f"{dbfile}: not a readable gallery database ({e})") from None
    if row is None:
        raise GalleryError(f"{dbfile}: not a gallery database (no schema version)")
    return int(row[0])


def upgrade(db: sqlite3.Connection, dbfile: Path, writable: bool) -> bool:
    """Bring the file to SCHEMA_VERSION; True when it changed (its index must be rebuilt)."""
    version = schema_of(db, dbfile)
    if version == SCHEMA_VERSION:
        return False
    if version != 1:
        raise GalleryError(f"{dbfile}: gallery schema {version}; this reir reads {SCHEMA_VERSION} (and upgrades 1)")
    if not writable:
        raise GalleryError(
            f"{dbfile}: built by an older reir (gallery schema 1); upgrade it once with "
            f"`reir gallery rebuild {dbfile.parent}` (rebuilds its search index; nothing stored is lost)"
        )
    with db:
        db.executescript(SCHEMA)
        next_image = db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM images").fetchone()[0]
        next_key = db.execute("SELECT COALESCE(MAX(key), 0) + 1 FROM instances").fetchone()[0]
        db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [("schema", str(SCHEMA_VERSION)), ("next_image", str(next_image)), ("next_key", str(next_key))],
        )
        # schema 1 kept an HNSW index at f32/f16/bf16; the new index stores f32 or f16
        db.execute("UPDATE meta SET value = 'f16' WHERE key = 'dtype' AND value NOT IN ('f32', 'f16')")
        db.execute("DELETE FROM meta WHERE key = 'hnsw'")
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    for stale in ("index.usearch", "index.json"):
        (dbfile.parent / stale).unlink(missing_ok=True)
    return True


def query_sample(db: sqlite3.Connection) -> np.ndarray | None:
    """The stored query vectors the index is fitted to (None: there are none)."""
    rows = db.execute("SELECT vector FROM query_sample ORDER BY id").fetchall()
    return np.stack([np.frombuffer(r[0], np.float32) for r in rows]) if rows else None


def writer_lock(path: Path) -> int:
    """One writer per gallery: an exclusive flock on G/writer.lock, which names its pid."""
    fd = os.open(path / "writer.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise GalleryLocked(f"{path}: gallery is being written by pid {pid}; wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def write_sample(db: sqlite3.Connection, queries: np.ndarray | None, dim: int) -> None:
    if queries is None:
        return
    q = np.atleast_2d(np.asarray(queries, np.float32))
    if q.shape[1] != dim:
        raise GalleryError(f"query sample dim {q.shape[1]} != gallery dim {dim}")
    if not np.isfinite(q).all():
        raise GalleryError("query sample holds NaN or infinite values")
    db.executemany("INSERT INTO query_sample (vector) VALUES (?)", [(v.tobytes(),) for v in q])
