"""Random galleries for the index tests: vectors drawn at random, queries in a low-dimensional
subspace (as a text head's are), and the exact ranking they must agree with."""

from __future__ import annotations

import numpy as np

from reir.engine.gallery.records import NewImage
from reir.engine.runtime.detections import Detections


def images(rng, n: int, start: int = 0, per: int = 12, tags=None, dim: int = 48) -> list[NewImage]:
    out = []
    for i in range(start, start + n):
        emb = rng.standard_normal((per, dim)).astype(np.float32) * rng.uniform(0.5, 3.0)
        dets = Detections(rng.random((per, 4)) * 100, rng.random(per), emb)
        out.append(NewImage(f"img{i}.png", f"{i:064x}", 100, 100, 10, dets, tags))
    return out


def sample(rng, n: int = 1024, dim: int = 48) -> np.ndarray:
    """Queries that live in a 12-d subspace, as a text head's do."""
    basis = np.linalg.qr(rng.standard_normal((dim, 12)))[0].T
    return (rng.standard_normal((n, 12)) @ basis).astype(np.float32)


def exact_keys(g, q: np.ndarray, k: int) -> list[int]:
    """The exact top-k instance keys of a one-shard gallery (f16 vectors, ties by key)."""
    rows = g.shards[0].db.execute("SELECT key, embedding FROM instances").fetchall()
    keys = np.array([r[0] for r in rows])
    emb = np.stack([np.frombuffer(r[1], np.float32) for r in rows]).astype(np.float16).astype(np.float32)
    s = emb @ q
    return keys[np.lexsort((keys, -s))][:k].tolist()
