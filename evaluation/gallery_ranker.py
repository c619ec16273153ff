"""Rank evaluation queries through a real gallery: the path a user's query takes.

`reir eval --bundle` scores with this, so an accuracy figure measures the product's search
(index, candidate sizes, exact re-rank) and not an in-memory shortcut; the exact ranking is
reported beside it. The gallery lives in a directory the caller owns (a temporary one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reir.engine.gallery.gallery import Gallery
from reir.engine.gallery.records import NewImage
from reir.engine.runtime.bundle import Bundle

from .ranking import Hits


class GalleryRanker:
    def __init__(self, path: Path, bundle: Bundle, progress: bool = False):
        self.path, self.bundle, self.progress = path, bundle, progress
        self.gallery: Gallery | None = None
        self._ids: dict[int, int] = {}  # gallery image id -> dataset image id

    def __call__(self, queries: np.ndarray, dets: dict, k: int) -> list[Hits]:
        if self.gallery is None:
            self._fill(dets)
        out = []
        for found in self.gallery.search(queries, k=k, per_image=False):
            out.append(
                Hits(
                    np.array([self._ids[h.image_id] for h in found], np.int64),
                    np.array([h.box for h in found], np.float64).reshape(-1, 4),
                    np.array([h.score for h in found], np.float64),
                )
            )
        return out

    def _fill(self, dets: dict) -> None:
        g = Gallery.create(
            self.path,
            self.bundle.dim,
            model=self.bundle.model_id,
            queries=self.bundle.query_sample(),
        )
        news = [NewImage(str(i), f"{i:064x}", 0, 0, 0, d) for i, d in dets.items() if len(d.scores)]
        for s in range(0, len(news), 1000):
            ids = g.add(news[s : s + 1000], save_index=False)
            self._ids.update({gid: int(n.path) for gid, n in zip(ids, news[s : s + 1000], strict=True)})
        g.save()
        self.gallery = g

    def describe(self) -> dict:
        """What searched: {"kind", "rows"} of the index (and closes the gallery)."""
        if self.gallery is None:
            return {"kind": "none", "rows": 0}
        index = self.gallery.info().per_shard[0].index
        self.gallery.close()
        return {"kind": index.kind, "rows": index.rows}
