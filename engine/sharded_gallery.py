"""A sharded gallery: S ordinary galleries in one directory, searched as one.

    G/shards.json     format, shard count, model, dim, dtype, how an image maps to a shard
    G/shard-000/ ...  ordinary galleries (engine/gallery.py), each with every guarantee a
                      gallery has: SQLite as the source of truth, one writer, kill-safe

An image goes to shard `int(sha256[:16], 16) % S`, so the same bytes always land in the
same shard and a re-run of an indexing job (on one host or on a cluster) skips them there.
Image ids and instance keys are made global as `local * S + shard`: unique across shards,
stable, and a shard is found from an id without a lookup.

Search is the exact merge of per-shard top-k: every image lives in one shard, so the best
k images of the union are among the best k of each shard. A sharded gallery returns the
same images, boxes and scores one gallery holding the same images would (ties aside).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from pathlib import Path
from typing import Any

import numpy as np

from .fsutil import atomic_directory, write_json_atomic
from .gallery import Gallery, GalleryError
from .indexer import index_images
from .records import Hit, NewImage

MANIFEST = "shards.json"
FORMAT = "reir-sharded-gallery"
ASSIGN = "int(sha256[:16], 16) % shards"


def shard_of(sha256: str, shards: int) -> int:
    """The shard an image belongs to, from its content hash alone."""
    return int(sha256[:16], 16) % shards


def shard_dir(root: Path, shard: int) -> Path:
    return Path(root) / f"shard-{shard:03d}"


def global_hit(hit: Hit, shard: int, shards: int) -> Hit:
    """A shard's hit with ids that are unique across the sharded gallery."""
    return dataclasses.replace(
        hit, image_id=hit.image_id * shards + shard, instance_key=hit.instance_key * shards + shard
    )


def merge_hits(per_shard: list[list[Hit]], k: int) -> list[Hit]:
    """The k best of per-shard rankings (each already in global ids); ties by image id, so
    the order does not depend on which shard answered first."""
    return heapq.nsmallest(k, (h for hits in per_shard for h in hits), key=lambda h: (-h.score, h.image_id))


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GalleryError(f"{f}: not a readable sharded-gallery manifest ({e})") from None
    if m.get("format") != FORMAT or not isinstance(m.get("shards"), int) or m["shards"] < 1:
        raise GalleryError(
            f"{f}: not a sharded-gallery manifest (format {m.get('format')!r}, shards {m.get('shards')!r})"
        )
    return m


class ShardedGallery:
    """The Gallery surface (add, add_images, remove_images, search, image, info, check) over
    S shards. One process holds every shard's writer lock while it writes."""

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[Gallery]):
        self.path, self.manifest, self.shards = path, manifest, shards
        self.dim, self.dtype = int(manifest["dim"]), manifest["dtype"]
        self.model, self.bundle = manifest.get("model", ""), manifest.get("bundle", "")
        self.writable = shards[0].writable

    @classmethod
    def create(
        cls,
        path: str | Path,
        shards: int,
        dim: int,
        dtype: str = "f16",
        model: str = "",
        bundle: str = "",
        queries: np.ndarray | None = None,
    ) -> ShardedGallery:
        """New empty shards, built under a temporary name and renamed into place: a kill
        during creation leaves no half-made gallery."""
        path = Path(path)
        if shards < 1:
            raise GalleryError(f"shards must be at least 1, got {shards}")
        if (path / MANIFEST).exists() or (path / "gallery.sqlite").exists():
            raise GalleryError(f"{path}: a gallery already exists here (open it instead)")
        manifest = {"format": FORMAT, "version": 1, "shards": shards, "assign": ASSIGN}
        manifest |= {"dim": dim, "dtype": dtype, "model": model, "bundle": bundle}
        with atomic_directory(path) as tmp:
            for s in range(shards):
                Gallery.create(shard_dir(tmp, s), dim, dtype, model, bundle, queries).close()
            write_json_atomic(tmp / MANIFEST, manifest)
        return cls.open(path, writable=True, progress=False)

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, progress: bool = True) -> ShardedGallery:
        path = Path(path)
        manifest = read_manifest(path)
        opened: list[Gallery] = []
        try:
            for s in range(manifest["shards"]):
                if not shard_dir(path, s).is_dir():
                    raise GalleryError(f"{shard_dir(path, s)}: shard {s} of {manifest['shards']} is missing")
                opened.append(Gallery.open(shard_dir(path, s), writable=writable, progress=progress))
        except BaseException:
            for g in opened:
                g.close()
            raise
        for g in opened:
            if g.model != manifest["model"] or g.dim != manifest["dim"]:
                raise GalleryError(f"{g.path}: model or dim differs from {path / MANIFEST}")
        return cls(path, manifest, opened)

    def close(self) -> None:
        for g in self.shards:
            g.close()

    def __enter__(self) -> ShardedGallery:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def count(self) -> int:
        return len(self.shards)

    # -- writing ------------------------------------------------------------------------
    def known(self, sha256s: list[str]) -> set[str]:
        by_shard: dict[int, list[str]] = {}
        for sha in sha256s:
            by_shard.setdefault(shard_of(sha, self.count), []).append(sha)
        return set().union(*(self.shards[s].known(shas) for s, shas in by_shard.items()))

    def add(self, images: list[NewImage], save_index: bool = True) -> list[int]:
        """Each image into its shard (one transaction per shard touched); global ids back."""
        groups: dict[int, list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(shard_of(im.sha256, self.count), []).append(i)
        ids = [0] * len(images)
        for s, members in groups.items():
            local = self.shards[s].add([images[i] for i in members], save_index=save_index)
            for i, lid in zip(members, local, strict=True):
                ids[i] = lid * self.count + s
        return ids

    def add_images(
        self, images: list, engine, tags: dict[str, str] | None = None, batch: int = 32, progress: bool = False
    ):
        return index_images(self, engine, [Path(p) for p in images], tags, batch, progress=progress)

    def remove_images(self, ids: list[int]) -> int:
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(int(i) % self.count, []).append(int(i) // self.count)
        return sum(self.shards[s].remove_images(local) for s, local in groups.items())

    def query_sample(self) -> np.ndarray | None:
        return self.shards[0].query_sample()

    def set_query_sample(self, queries: np.ndarray, progress: bool = False) -> None:
        for g in self.shards:
            g.set_query_sample(queries, progress)

    def save(self) -> None:
        for g in self.shards:
            g.save()

    def rebuild(self, progress: bool = True) -> None:
        for g in self.shards:
            g.rebuild(progress)

    # -- reading ------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        per_image: bool = True,
        tags: dict[str, str] | None = None,
        exact: bool = False,
    ) -> list[list[Hit]]:
        """Gallery.search over every shard, merged exactly."""
        per_shard = [g.search(queries, k, per_image, tags, exact) for g in self.shards]
        out = []
        for qi in range(len(per_shard[0])):
            lists = [[global_hit(h, s, self.count) for h in per_shard[s][qi]] for s in range(self.count)]
            out.append(merge_hits(lists, k))
        return out

    def image(self, image_id: int) -> dict[str, Any] | None:
        s, local = image_id % self.count, image_id // self.count
        row = self.shards[s].image(local)
        return None if row is None else row | {"id": image_id, "shard": s}

    def info(self) -> dict[str, Any]:
        parts = [g.info() for g in self.shards]
        total = {key: sum(p[key] for p in parts) for key in ("images", "instances", "bytes_on_disk")}
        return (
            {"path": str(self.path), "shards": self.count, "assign": self.manifest["assign"]}
            | total
            | {
                "dim": self.dim,
                "dtype": self.dtype,
                "model": self.model,
                "per_shard": parts,
            }
        )

    def check(self) -> list[str]:
        return [f"shard {s}: {p}" for s, g in enumerate(self.shards) for p in g.check()]

    def measure(self) -> list[dict | None]:
        return [g.measure() for g in self.shards]


def open_gallery(path: str | Path, writable: bool = False, progress: bool = True) -> Gallery | ShardedGallery:
    """A gallery directory, sharded or not: what every command that takes --gallery opens."""
    if is_sharded(path):
        return ShardedGallery.open(path, writable, progress)
    return Gallery.open(path, writable, progress)
