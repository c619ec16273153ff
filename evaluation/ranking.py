"""Ranked retrieval output and the dot-product ranking the paper uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Hits:
    """One query's ranked list of gallery instances, best first."""

    image_ids: np.ndarray  # [L] int64
    boxes: np.ndarray  # [L, 4] xyxy, original pixels
    scores: np.ndarray  # [L]

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if not (len(self.image_ids) == len(self.boxes) == len(self.scores)):
            raise ValueError("Hits: image_ids, boxes and scores must have the same length")

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class GalleryArrays:
    """Every gallery instance: its embedding, image and box (the stored index, in memory)."""

    embeddings: np.ndarray  # [N, D], raw (not normalised): the model scores by dot product
    image_ids: np.ndarray  # [N]
    boxes: np.ndarray  # [N, 4]


def rank_gallery(queries: np.ndarray, gallery: GalleryArrays, k: int, chunk: int = 256) -> list[Hits]:
    """Exact top-k by dot product, for every query. Ties keep gallery order (stable)."""
    queries = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    n = len(gallery.image_ids)
    k = min(k, n)
    out: list[Hits] = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ np.asarray(gallery.embeddings, dtype=np.float32).T
        for row in scores:
            if k == 0:
                idx = np.zeros(0, dtype=np.int64)
            else:
                part = np.argpartition(-row, k - 1)[:k] if k < n else np.arange(n)
                # Stable sort by (-score, gallery index): deterministic ties.
                idx = part[np.lexsort((part, -row[part]))]
            out.append(Hits(gallery.image_ids[idx], gallery.boxes[idx], row[idx]))
    return out
