"""What a gallery reports about itself: typed, the same for one shard or many."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from reir.engine.search.agreement import Agreement


@dataclass(frozen=True)
class IndexInfo:
    kind: str  # the candidate design searches use, or "exact scan"
    rows: int
    dead_rows: int
    bytes_per_instance: dict[str, float]  # hot (every query), vectors (mapped), index_on_disk
    damage: str | None = None  # why the index files could not be used (a reader scans exactly)
    query_space: dict[str, Any] | None = None  # dims, energy, trained_rows
    agreement: dict[str, Any] | None = None  # measured at the last calibration
    candidates: dict[str, int] | None = None  # the calibrated setting
    latency_at_calibration_ms: dict[str, float] | None = None


@dataclass(frozen=True)
class ShardInfo:
    shard: int
    path: str
    images: int
    instances: int
    generation: int
    query_sample: int
    bytes_on_disk: int
    index: IndexInfo


@dataclass(frozen=True)
class GalleryInfo:
    path: str
    shards: int
    images: int
    instances: int
    dim: int
    dtype: str
    model: str
    bundle: str
    bytes_on_disk: int
    min_score: float  # instances scored lower are not stored (Gallery.create)
    per_shard: tuple[ShardInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measurement:
    """A shard's agreement with the exact ranking, measured now on held-out sample queries."""

    shard: int
    rows: int
    agreement: Agreement | None  # None: the shard answers every search by the exact scan
    met: bool | None = None  # the targets of its last calibration hold
    exact_because: str | None = None  # why every search scans all vectors

    def summary(self) -> str:
        if self.agreement is None:
            return f"every search scans all vectors: {self.exact_because}"
        a = self.agreement
        return (
            f"search agrees with the exact scan on {a.queries} held-out sample queries: top-1 {a.top1:.4f}, "
            f"top-10 images {a.top10:.4f}, instance recall@10 {a.recall10:.4f}"
        )
