"""`Retriever`: expressions in, ranked (image, box, score) hits out, in this process.

One text encoding plus one vector search: the gallery was encoded offline, so no image is
touched. It speaks the search contract (engine/serving/contract.py), as the servers do.

    r = Retriever(Engine.open("models/synth"), Gallery.open("g"))
    for hit in r.search("the small red circle left of the blue star", k=10).hits:
        print(hit.image_id, hit.path, hit.box, hit.score)
"""

from __future__ import annotations

from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.engine import Engine
from reir.engine.serving.contract import Client, QueryResult, RequestError, SearchRequest, SearchResponse


class Retriever(Client):
    def __init__(self, engine: Engine, gallery: Gallery):
        gallery.require_model(engine.model_id, engine.dim)  # vectors of another model are meaningless
        self.engine, self.gallery = engine, gallery

    def answer(self, request: SearchRequest) -> SearchResponse:
        if request.gallery is not None:
            raise RequestError(
                "gallery", f"this Retriever searches {self.gallery.path} only; a SearchService serves galleries by name"
            )
        queries, truncated = self.engine.encode(list(request.texts))
        hits = self.gallery.search(queries, request.k, request.per_image, request.tags)
        return SearchResponse(tuple(QueryResult(tuple(h), t) for h, t in zip(hits, truncated, strict=True)))
