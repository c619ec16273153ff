"""`Retriever`: an expression in, ranked (image, box, score) hits out. One text encoding
plus one vector search; the gallery was encoded offline, so no image is touched."""

from __future__ import annotations

from .engine import Engine
from .gallery import Gallery, GalleryError, Hit


class Retriever:
    def __init__(self, engine: Engine, gallery: Gallery):
        if gallery.model and gallery.model != engine.model_id:
            raise GalleryError(
                f"{gallery.path}: indexed with another model ({gallery.model[:12]}...), this bundle is "
                f"{engine.model_id[:12]}...; its vectors would not be comparable (re-index with this bundle)"
            )
        if gallery.dim != engine.dim:
            raise GalleryError(f"{gallery.path}: dim {gallery.dim} != the bundle's {engine.dim}")
        self.engine, self.gallery = engine, gallery
        self.last_truncated: list[bool] = []  # per expression of the last search: cut at the max length

    def search(
        self, expression: str | list[str], k: int = 10, per_image: bool = True, tags: dict[str, str] | None = None
    ) -> list[Hit] | list[list[Hit]]:
        """Hits for one expression, or one list of hits per expression when given a list."""
        many = not isinstance(expression, str)
        texts = list(expression) if many else [expression]
        for t in texts:
            if not t or not t.strip():
                raise ValueError("empty expression")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries, self.last_truncated = self.engine.encode(texts)
        hits = self.gallery.search(queries, k, per_image, tags)
        return hits if many else hits[0]
