"""A gallery: S shards searched as one (S = 1 unless it was created with more).

    G/gallery.sqlite, G/index/    one shard: the directory is the shard (engine/gallery/shard.py)
    G/shards.json                 S > 1: format, shard count, model, dim, dtype, how images map to shards
    G/shard-000/ ... shard-S-1/   each a shard with every guarantee of one: SQLite the source
                                  of truth, one writer, kill-safe, resumable

An image goes to shard `int(sha256[:16], 16) % S`, so the same bytes always land in the
same shard and a re-run of an indexing job (on one host or on a cluster) skips them there.
Image ids and instance keys are made global as `local * S + shard`: unique across shards,
stable, and a shard is found from an id without a lookup (with S = 1 they are the local ones).

Search is the exact merge of per-shard top-k: every image lives in one shard, so the best
k images of the union are among the best k of each shard. A gallery of S shards returns
the same images, boxes and scores as one of a single shard holding the same images.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import numbers
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reir.engine.fsutil import atomic_directory, write_json_atomic
from reir.engine.gallery.database import GalleryError, connect
from reir.engine.gallery.info import GalleryInfo, Measurement
from reir.engine.gallery.records import Hit, NewImage
from reir.engine.gallery.shard import Shard
from reir.engine.search.candidates import DEFAULT, DESIGNS

MANIFEST = "shards.json"
FORMAT = "reir-sharded-gallery"
ASSIGN = "int(sha256[:16], 16) % shards"


class ModelMismatch(GalleryError):
    """The gallery's vectors come from another model than the one asked to use it."""


def shard_of(sha256: str, shards: int) -> int:
    """The shard an image belongs to, from its content hash alone."""
    return int(sha256[:16], 16) % shards


def shard_dir(root: Path, shard: int, shards: int) -> Path:
    return Path(root) if shards == 1 else Path(root) / f"shard-{shard:03d}"


def merge_hits(per_shard: list[list[Hit]], k: int) -> list[Hit]:
    """The k best of per-shard rankings (each already in global ids); ties by image id, so
    the order does not depend on which shard answered first."""
    return heapq.nsmallest(k, (h for hits in per_shard for h in hits), key=lambda h: (-h.score, h.image_id))


def exists(path: str | Path) -> bool:
    return (Path(path) / "gallery.sqlite").is_file() or (Path(path) / MANIFEST).is_file()


@dataclass(frozen=True)
class GalleryMeta:
    """What a gallery is, read without opening its index: enough to pair it with a model."""

    path: Path
    shards: int
    dim: int
    dtype: str
    model: str
    bundle: str

    @classmethod
    def read(cls, path: str | Path) -> GalleryMeta:
        path = Path(path)
        if (path / MANIFEST).is_file():
            m = _read_manifest(path)
            return cls(path, m["shards"], int(m["dim"]), m["dtype"], m.get("model", ""), m.get("bundle", ""))
        dbfile = path / "gallery.sqlite"
        if not dbfile.is_file():
            raise GalleryError(f"{path}: no gallery here (missing gallery.sqlite; create one with `reir index`)")
        try:
            db = connect(dbfile, read_only=True)
            try:
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            finally:
                db.close()
            return cls(path, 1, int(meta["dim"]), meta["dtype"], meta.get("model", ""), meta.get("bundle", ""))
        except (sqlite3.DatabaseError, KeyError, ValueError) as e:
            raise GalleryError(f"{dbfile}: not a readable gallery database ({e})") from None

    def require_model(self, model_id: str, dim: int) -> None:
        """Refuse a model whose vectors would not be comparable with the stored ones."""
        if self.model and self.model != model_id:
            raise ModelMismatch(
                f"{self.path}: indexed with another model ({self.model[:12]}...), this bundle is "
                f"{model_id[:12]}...; its vectors would not be comparable (re-index it with this bundle, "
                "or use the bundle it was indexed with)"
            )
        if self.dim != dim:
            raise ModelMismatch(f"{self.path}: vectors of dim {self.dim}, the bundle's are {dim}")

    def bundle_path(self, given: str | Path | None = None) -> Path:
        """The bundle to use with this gallery: `given`, else the one that indexed it (if it
        is still there), else the shipped model."""
        from reir.engine.runtime.bundle import default_bundle

        if given is not None:
            return Path(given)
        if self.bundle and Path(self.bundle).is_dir():
            return Path(self.bundle)
        return default_bundle()


def _read_manifest(path: Path) -> dict[str, Any]:
    f = path / MANIFEST
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GalleryError(f"{f}: not a readable sharded-gallery manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), int) or m["shards"] < 1:
        shown = (m.get("format"), m.get("shards")) if isinstance(m, dict) else (None, None)
        raise GalleryError(f"{f}: not a sharded-gallery manifest (format {shown[0]!r}, shards {shown[1]!r})")
    return m


class Gallery:
    """Images, their instances and a search over them. Open one with `Gallery.open(path)`
    (read-only: any number of processes) or `Gallery.open(path, writable=True)` (one
    writer at a time; it holds every shard's lock)."""

    def __init__(self, meta: GalleryMeta, shards: list[Shard], writable: bool):
        self.meta, self.shards, self.writable = meta, shards, writable

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
        shards: int = 1,
        candidates: str = DEFAULT,
        min_score: float = 0.0,
    ) -> Gallery:
        """A new, empty gallery. `model` names the embedding space (the bundle's model id):
        vectors from another model would be silently meaningless, so it is checked on use.
        `queries`: a sample of query vectors the search index is fitted to (the bundle's;
        without one every search scans all vectors, exact but slow on large galleries).
        Several shards are built under a temporary name and renamed into place, so a kill
        during creation leaves nothing that looks like a gallery. `min_score`: instances the
        detector scored lower are not stored (each image keeps its best one); on the shipped
        model 0.1 keeps a third of them at the same retrieval accuracy (docs/search.md)."""
        path = Path(path)
        if not (isinstance(min_score, int | float) and 0.0 <= min_score < 1.0):
            raise GalleryError(f"min_score must be a detection score in [0, 1), got {min_score!r}")
        if not isinstance(shards, int) or shards < 1:
            raise GalleryError(f"shards must be a positive integer, got {shards!r}")
        if candidates not in DESIGNS:  # before anything is written
            raise GalleryError(f"unknown candidate index design {candidates!r}; the designs are {', '.join(DESIGNS)}")
        if exists(path):
            raise GalleryError(f"{path}: a gallery already exists here (open it instead)")
        if shards == 1:
            shard = Shard.create(path, dim, dtype, model, bundle, queries, candidates, min_score=min_score)
            return cls(GalleryMeta(path, 1, dim, dtype, model, bundle), [shard], True)
        manifest = {"format": FORMAT, "version": 1, "shards": shards, "assign": ASSIGN}
        manifest |= {"dim": dim, "dtype": dtype, "model": model, "bundle": bundle}
        with atomic_directory(path) as tmp:
            for s in range(shards):
                where = shard_dir(tmp, s, shards)
                Shard.create(where, dim, dtype, model, bundle, queries, candidates, min_score=min_score).close()
            write_json_atomic(tmp / MANIFEST, manifest)
        return cls.open(path, writable=True, progress=False)

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, progress: bool = True, shard: int | None = None) -> Gallery:
        """`shard`: open only that shard (a serving replica of one shard); its searches
        answer in the gallery's global ids."""
        meta = GalleryMeta.read(path)
        numbers = range(meta.shards) if shard is None else [shard]
        if shard is not None and not 0 <= shard < meta.shards:
            raise GalleryError(f"{meta.path}: has {meta.shards} shard(s), no shard {shard}")
        opened: list[Shard] = []
        try:
            for s in numbers:
                where = shard_dir(meta.path, s, meta.shards)
                if not (where / "gallery.sqlite").is_file():
                    raise GalleryError(f"{where}: shard {s} of {meta.shards} is missing")
                opened.append(Shard.open(where, writable, progress, number=s))
                if opened[-1].model != meta.model or opened[-1].dim != meta.dim:
                    raise GalleryError(f"{where}: model or dim differs from {meta.path / MANIFEST}")
        except BaseException:
            for g in opened:
                g.close()
            raise
        if meta.shards == 1:  # the shard's own meta, as opening left it (a writer may have upgraded it)
            s = opened[0]
            meta = GalleryMeta(meta.path, 1, s.dim, s.dtype, s.model, s.bundle)
        return cls(meta, opened, writable)

    @classmethod
    def for_bundle(
        cls,
        path: str | Path,
        bundle,
        shards: int | None = None,
        dtype: str = "f16",
        progress: bool = True,
        candidates: str | None = None,
        min_score: float | None = None,
    ) -> Gallery:
        """The gallery at `path` opened for writing with `bundle`'s model, or a new one made
        for it (`shards` shards, default 1; `candidates`: the index design, default the
        default's; `min_score`: see `create`, default 0): what `reir index` and `reir
        cluster index` write to."""
        if exists(path):
            g = cls.open(path, writable=True, progress=progress)
            try:
                if shards is not None and g.shard_count != shards:
                    raise GalleryError(f"{path}: has {g.shard_count} shard(s), not {shards}")
                g.require_model(bundle.model_id, bundle.dim)
                if min_score is not None and g.shards[0].min_score != min_score:
                    raise GalleryError(
                        f"{path}: stores instances scoring {g.shards[0].min_score} or more, not {min_score} "
                        "(a gallery keeps the cut it was created with)"
                    )
            except BaseException:
                g.close()
                raise
            return g
        return cls.create(
            path,
            bundle.dim,
            dtype,
            model=bundle.model_id,
            bundle=str(bundle.path.resolve()),
            queries=bundle.query_sample(),
            shards=shards or 1,
            **({"candidates": candidates} if candidates else {}),
            min_score=min_score or 0.0,
        )

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self.meta.path

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def dtype(self) -> str:
        return self.meta.dtype

    @property
    def model(self) -> str:
        return self.meta.model

    @property
    def bundle(self) -> str:
        return self.meta.bundle

    @property
    def shard_count(self) -> int:
        return self.meta.shards

    def require_model(self, model_id: str, dim: int) -> None:
        self.meta.require_model(model_id, dim)

    # -- writing ------------------------------------------------------------------------
    def _shard(self, s: int) -> Shard:
        for shard in self.shards:
            if shard.number == s:
                return shard
        raise GalleryError(f"{self.path}: shard {s} is not open here")

    def known(self, sha256s: list[str]) -> set[str]:
        """Which of these content hashes are already stored (so indexing resumes)."""
        by_shard: dict[int, list[str]] = {}
        for sha in sha256s:
            by_shard.setdefault(shard_of(sha, self.shard_count), []).append(sha)
        return set().union(*(self._shard(s).known(shas) for s, shas in by_shard.items()))

    def add(self, images: list[NewImage], save_index: bool = True) -> list[int]:
        """Detected images, each into its shard (one transaction per shard touched); their
        global ids. `save_index=False` defers the index's commit point to `save()`."""
        groups: dict[int, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(shard_of(im.sha256, self.shard_count), []).append(i)
        ids = [0] * len(images)
        for s, members in groups.items():
            local = self._shard(s).add([images[i] for i in members], save_index=save_index)
            for i, lid in zip(members, local, strict=True):
                ids[i] = lid * self.shard_count + s
        return ids

    def add_images(
        self, paths: list, engine, tags: dict[str, str] | None = None, batch: int = 32, progress: bool = False
    ):
        """Detect and add image files (a file already here by content hash is skipped);
        returns the IndexReport (added, skipped with reasons, ...). A gallery without a query
        sample takes the engine's bundle's."""
        from reir.engine.gallery.ingest import ingest

        self.require_model(engine.model_id, engine.dim)
        return ingest(self, engine, [Path(p) for p in paths], tags, batch, progress=progress)

    def remove_images(self, ids: list[int]) -> int:
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(int(i) % self.shard_count, []).append(int(i) // self.shard_count)
        return sum(self._shard(s).remove_images(local) for s, local in groups.items())

    def query_sample(self) -> np.ndarray | None:
        return self.shards[0].query_sample()

    def set_query_sample(self, queries: np.ndarray, progress: bool = False) -> None:
        """Replace the query vectors the index is fitted to (a bundle's sample, or a
        deployment's own query log): every shard's index is refitted and re-checked."""
        for s in self.shards:
            s.set_query_sample(queries, progress)

    def save(self) -> None:
        """A commit point for the index (add() with save_index=False defers it)."""
        for s in self.shards:
            s.save()

    def rebuild(self, progress: bool = True) -> None:
        """Rebuild every shard's index from the embeddings stored in SQLite."""
        for s in self.shards:
            s.rebuild(progress)

    def refresh(self) -> bool:
        """A read-only gallery catches up with what writers committed since it opened or last
        refreshed (images added, images removed); True when something changed. It costs one
        SQLite read per shard when nothing did. A reader never refreshes on its own: the
        servers call this every second; an embedded reader calls it when it wants to see
        new writes (a writer's own gallery is always current)."""
        return any([s.refresh() for s in self.shards])

    @property
    def generation(self) -> tuple[int, ...]:
        """Per shard, the committed generation searches answer from (each write bumps it)."""
        return tuple(s.generation for s in self.shards)

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
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise GalleryError(f"query vectors of shape {list(queries.shape)}, the gallery's dim is {self.dim}")
        if not isinstance(k, numbers.Integral) or k < 1:
            raise GalleryError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        per_shard = [s.search(queries, k, per_image, tags, exact) for s in self.shards]
        out = []
        for qi in range(len(queries)):
            lists = [[self.globalise(h, s.number) for h in per_shard[j][qi]] for j, s in enumerate(self.shards)]
            out.append(lists[0] if len(lists) == 1 else merge_hits(lists, k))
        return out

    def globalise(self, hit: Hit, shard: int) -> Hit:
        """A shard's hit with ids that are unique across the gallery."""
        if self.shard_count == 1:
            return hit
        n = self.shard_count
        return dataclasses.replace(hit, image_id=hit.image_id * n + shard, instance_key=hit.instance_key * n + shard)

    def stored(self, limit: int | None = None) -> Iterator[NewImage]:
        """The stored images as they were added (detections and tags included), shard by
        shard: what copies a gallery into another layout without running the detector."""
        for s in self.shards:
            for im in s.stored(limit):
                yield im
                if limit is not None:
                    limit -= 1
            if limit is not None and limit <= 0:
                return

    def image(self, image_id: int) -> dict[str, Any] | None:
        n = self.shard_count
        row = self._shard(image_id % n).image(image_id // n)
        return None if row is None else row | {"id": image_id, "shard": image_id % n}

    def info(self) -> GalleryInfo:
        parts = tuple(s.info() for s in self.shards)
        return GalleryInfo(
            path=str(self.path),
            shards=self.shard_count,
            images=sum(p.images for p in parts),
            instances=sum(p.instances for p in parts),
            dim=self.dim,
            dtype=self.dtype,
            model=self.model,
            bundle=self.bundle,
            bytes_on_disk=sum(p.bytes_on_disk for p in parts) + _manifest_bytes(self.path),
            min_score=self.shards[0].min_score,
            per_shard=parts,
        )

    def check(self) -> list[str]:
        """Problems found (empty = consistent): SQLite itself, the index rows against SQLite,
        and the index's agreement with the exact scan, measured again now."""
        prefix = (lambda s: f"shard {s}: ") if self.shard_count > 1 else (lambda s: "")
        return [prefix(s.number) + p for s in self.shards for p in s.check()]

    def measure(self) -> list[Measurement]:
        """Each shard's agreement with the exact scan on held-out sample queries, now."""
        return [s.measure() for s in self.shards]


def _manifest_bytes(path: Path) -> int:
    f = path / MANIFEST
    return f.stat().st_size if f.is_file() else 0
