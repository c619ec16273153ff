"""What the visual graph gives for one image, in that image's own pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Detections:
    """One image's kept instances, boxes xyxy in original pixels, in descending score."""

    boxes: np.ndarray  # [n, 4]
    scores: np.ndarray  # [n]
    embeddings: np.ndarray  # [n, D]


def unpad(outputs, sizes: list[tuple[int, int]], input_hw: tuple[int, int]) -> list[Detections]:
    """Graph outputs (padded to K, input pixels) -> per image Detections in original pixels,
    clipped to the image: a predicted box (centre and size) may reach past the border, and a
    box outside the picture is no use to a caller drawing or cropping it."""
    boxes, scores, emb, num = (np.asarray(o) for o in outputs)
    h, w = input_hw
    out = []
    for b, (ow, oh) in enumerate(sizes):
        n = int(num[b])
        scale = np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float64)
        xyxy = np.clip(boxes[b, :n].astype(np.float64) * scale, 0.0, [ow, oh, ow, oh])
        out.append(Detections(xyxy, scores[b, :n].copy(), emb[b, :n].copy()))
    return out
