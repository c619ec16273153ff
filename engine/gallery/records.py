"""What goes into a gallery (an image and its detections) and what comes out (a hit)."""

from __future__ import annotations

from dataclasses import dataclass

from reir.engine.runtime.detections import Detections


@dataclass(frozen=True)
class Hit:
    image_id: int
    path: str
    box: tuple[float, float, float, float]  # xyxy, original pixels
    score: float  # dot product of query and instance embedding
    instance_key: int
    detection_score: float


@dataclass
class NewImage:
    path: str
    sha256: str
    width: int
    height: int
    bytes: int
    detections: Detections
    tags: dict[str, str] | None = None
