"""reir.engine: the serving runtime (no torch, no datasets, no metrics: a serving host or a
Jetson installs it alone). The main classes load lazily, so importing one module does not
pay for onnxruntime or faiss."""

from __future__ import annotations

_EXPORTS = {
    "Engine": "reir.engine.engine",
    "Bundle": "reir.engine.bundle",
    "Gallery": "reir.engine.gallery",
    "Hit": "reir.engine.gallery",
    "Retriever": "reir.engine.retriever",
    "TritonRetriever": "reir.engine.triton_client",
    "AsyncTritonRetriever": "reir.engine.triton_client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib  # lazy exports: importing one class does not load them all

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'reir.engine' has no attribute {name!r}")
