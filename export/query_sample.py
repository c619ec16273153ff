"""A bundle's query sample: query vectors of expressions like the ones it will serve.

A gallery fits its search index to the directions these vectors use and checks its
agreement with the exact ranking on a held-out part of them (engine/query_space.py,
engine/self_check.py). `reir export` writes one from the training expressions;
`reir export queries BUNDLE --data DIR` (or `--texts FILE`, e.g. a deployment's query log)
replaces it in an existing bundle. Vectors, not texts, are stored: a gallery needs no text
encoder to refit itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reir.datasets import load_dataset
from reir.engine.fsutil import atomic_file, write_bytes_atomic
from reir.engine.runtime.bundle import Bundle, sha256_file

FILE = "query_sample.npy"
SAMPLE = 4096


def expressions(data: Path, split: str = "train", n: int = SAMPLE, seed: int = 0) -> list[str]:
    """`n` expressions of a dataset's split, drawn reproducibly."""
    ds = load_dataset(data)
    texts = sorted({e.text for e in ds.expressions.values() if e.split == split})
    if not texts:
        raise ValueError(f"{data}: no {split!r} expressions to sample queries from")
    pick = np.random.default_rng(seed).permutation(len(texts))[:n]
    return [texts[i] for i in sorted(pick)]


def write_query_sample(bundle_dir: Path, texts: list[str], source: str) -> dict:
    """Encode `texts` with the bundle's own text graph; store them and list them in the
    manifest (the vectors first, then the manifest, each atomically)."""
    bundle = Bundle.open(bundle_dir)
    encoder = bundle.text_encoder()
    vecs = np.concatenate([encoder(texts[s : s + 256]) for s in range(0, len(texts), 256)])
    with atomic_file(bundle_dir / FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, vecs.astype(np.float16), allow_pickle=False)
    m = dict(bundle.manifest)
    m["query_sample"] = {"file": FILE, "count": len(vecs), "source": source}
    m["files"] = dict(m["files"]) | {
        FILE: {"sha256": sha256_file(bundle_dir / FILE), "bytes": (bundle_dir / FILE).stat().st_size}
    }
    write_bytes_atomic(bundle_dir / "manifest.json", (json.dumps(m, indent=2) + "\n").encode("utf-8"))
    return m["query_sample"]
