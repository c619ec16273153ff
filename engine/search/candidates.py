"""Candidate indexes: what proposes the rows a search then scores exactly.

A gallery's search has two parts. A candidate index (stage 1, and a cheap stage 2 if it
has one) proposes about `setting.rerank` rows likely to hold a query's exact top; the
search index (engine/search/index.py) scores those exactly against the stored vectors and
sorts them. Only the candidate set is approximate, and the gallery's self-check
(engine/search/agreement.py) picks the cheapest setting of the design's schedule that
agrees with the exact ranking.

A new design is one file with a class that follows `CandidateIndex` and one line in
`DESIGNS` below (docs/engine.md walks through it). Its files live in G/index/ beside the
vectors; they are a cache, and every way they can be damaged ends in a rebuild from SQLite
or an exact scan, never a wrong answer (tests/test_index_damage.py covers every file).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from reir.engine.search.query_space import QuerySpace

# kind -> "module:Class"; the first is the default of a new gallery
DESIGNS = {
    "projected-pq": "reir.engine.search.projected:ProjectedIndex",
    "ivf-pq": "reir.engine.search.partitioned:PartitionedIndex",
}
DEFAULT = next(iter(DESIGNS))


class Setting(Protocol):
    """How hard one search looks: `rerank` rows go to the exact re-rank."""

    rerank: int

    def grown(self, factor: float) -> Setting:
        """The same setting for a gallery `factor` times larger (or with a safety margin)."""

    def widened(self) -> Setting:
        """A setting that looks at more rows (a filter or removals left too few)."""

    def at_least(self, rerank: int) -> Setting:
        """The same setting re-ranking at least `rerank` rows (a large k needs them)."""

    def as_dict(self) -> dict[str, int]: ...


class CandidateIndex(Protocol):
    kind: ClassVar[str]
    # how much harder than the check queries needed a search looks (agreement.MARGIN)
    margin: ClassVar[float]

    @classmethod
    def train(cls, space: QuerySpace, sample: np.ndarray, rows: int) -> CandidateIndex:
        """An empty index fitted to `sample` (gallery vectors [n, D], a few thousand suffice)
        for a gallery of about `rows` rows."""

    @property
    def rows(self) -> int: ...

    def add(self, vectors: np.ndarray) -> None:
        """Index the next rows ([n, D] float32, in row order)."""

    def tidy(self, vectors) -> None:
        """Reorganise after growth, without retraining (a writer calls it before calibrating
        and saving); `vectors(rows)` reads stored vectors."""

    @classmethod
    def schedule(cls) -> Sequence[Setting]:
        """Settings the self-check tries, cheapest first."""

    @classmethod
    def setting(cls, values: dict[str, int]) -> Setting:
        """A setting from its `as_dict()` (as the index manifest stores it)."""

    def candidates(
        self, queries: np.ndarray, setting: Setting, alive: np.ndarray, rows: np.ndarray | None
    ) -> list[np.ndarray]:
        """Per query of `queries` [n, D]: at most about `setting.rerank` live rows, best
        first; `rows`: only these (a filter). One call for many queries is what makes a
        batch cheaper than its queries one by one: stage 1 reads the codes once for all."""

    def save(self, root: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Write or extend its files under `root` (atomically, or append-only with the
        manifest deciding what counts); returns its state for the manifest."""

    @classmethod
    def load(
        cls, root: Path, state: dict[str, Any], rows: int, vectors, writable: bool, space: QuerySpace
    ) -> CandidateIndex:
        """The index over the first `rows` rows as `state` committed them; raise on any
        damage (the caller falls back to SQLite). `vectors(rows)` reads stored vectors."""

    def memory_bytes(self) -> int:
        """Bytes a query touches (kept in RAM)."""


def design(kind: str) -> type[CandidateIndex]:
    """The class registered under `kind`."""
    if kind not in DESIGNS:
        raise ValueError(f"unknown candidate index {kind!r}; the designs are {sorted(DESIGNS)}")
    module, name = DESIGNS[kind].split(":")
    return getattr(importlib.import_module(module), name)
