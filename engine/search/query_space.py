"""The query space: the few directions that text queries actually use.

A query vector is one pooled text embedding mapped through a linear head, and its energy
sits in a low-dimensional subspace: on the shipped model 107 of its 448 directions hold
99 % of it (`reir gallery info` shows a gallery's count). A score is q . x, so only x's
component in that subspace matters up to q's small residual, and a search can rank
candidates there, then re-rank exactly. The directions come
from a sample of real query vectors (the bundle's, or a deployment's own query log): the
top right singular vectors of the sample, uncentred, because scores are uncentred dot
products.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENERGY = 0.99  # share of the sample's squared norm the kept directions must hold
MIN_DIMS, MAX_DIMS = 32, 256


@dataclass(frozen=True)
class QuerySpace:
    basis: np.ndarray  # [r, D] float32, orthonormal rows, by decreasing energy
    energy: float  # share of the fitting sample's energy inside the span
    strength: np.ndarray | None = None  # [r] the sample's RMS along each direction, relative to the first

    @classmethod
    def fit(cls, sample: np.ndarray, energy: float = ENERGY) -> QuerySpace:
        """The smallest span holding `energy` of the sample (clamped to [MIN_DIMS, MAX_DIMS];
        all of D when D is smaller: then it is a rotation and loses nothing)."""
        sample = np.asarray(sample, np.float64)
        if sample.ndim != 2 or len(sample) < 2:
            raise ValueError(f"a query sample needs at least 2 vectors, got shape {list(sample.shape)}")
        _, s, vt = np.linalg.svd(sample, full_matrices=False)
        share = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
        dims = int(np.searchsorted(share, energy) + 1)
        dims = min(max(MIN_DIMS, min(MAX_DIMS, dims)), len(vt))
        strength = (s[:dims] / max(float(s[0]), 1e-30)).astype(np.float32)
        return cls(np.ascontiguousarray(vt[:dims], np.float32), float(share[dims - 1]), strength)

    @property
    def dims(self) -> int:
        return self.basis.shape[0]

    def residual(self, q: np.ndarray) -> np.ndarray:
        """Share of each query's norm outside the span, [n]: large for a query unlike the sample."""
        q = np.atleast_2d(np.asarray(q, np.float32))
        inside = (q @ self.basis.T) @ self.basis
        return np.linalg.norm(q - inside, axis=1) / np.maximum(np.linalg.norm(q, axis=1), 1e-30)

    def project(self, x: np.ndarray) -> np.ndarray:
        """[n, D] -> [n, r] float32 (chunked, so a memory-mapped f16 array is never copied whole)."""
        x = np.asarray(x)
        out = np.empty((len(x), self.dims), np.float32)
        for s in range(0, len(x), 65536):
            out[s : s + 65536] = np.asarray(x[s : s + 65536], np.float32) @ self.basis.T
        return out
