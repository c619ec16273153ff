"""reir.engine: the serving runtime (no torch, no datasets, no metrics: a serving host or a
Jetson installs it alone). The module map is docs/engine.md:

    runtime/   the bundle and its ONNX Runtime sessions: text -> query vectors, images -> instances
    gallery/   a gallery: S shards of SQLite + search index; adding, removing, checking images
    search/    one shard's search: stored vectors, the query space, candidate indexes, agreement
    serving/   the search contract and everything that speaks it: Retriever, SearchService,
               the Triton and Ray Serve clients, the local tritonserver launcher

The main classes load lazily, so importing one does not pay for onnxruntime or faiss.
"""

from __future__ import annotations

_EXPORTS = {
    "Engine": "reir.engine.runtime.engine",
    "Bundle": "reir.engine.runtime.bundle",
    "Gallery": "reir.engine.gallery.gallery",
    "Hit": "reir.engine.gallery.records",
    "Retriever": "reir.engine.serving.retriever",
    "SearchService": "reir.engine.serving.service",
    "SearchRequest": "reir.engine.serving.contract",
    "SearchResponse": "reir.engine.serving.contract",
    "RequestError": "reir.engine.serving.contract",
    "TritonRetriever": "reir.engine.serving.triton_client",
    "AsyncTritonRetriever": "reir.engine.serving.triton_client",
    "ServeRetriever": "reir.engine.serving.serve_client",
    "AsyncServeRetriever": "reir.engine.serving.serve_client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib  # lazy exports: importing one class does not load them all

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reir.engine' has no attribute {name!r}")
