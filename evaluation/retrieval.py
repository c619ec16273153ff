"""Per-query outcomes and the REIR metrics built from them: BR@k is `box_recall`.

BR@k(tau), as the official `RetrievalGroundingEvaluator` computes it: sort all gallery
instances by score; inst* = the highest-ranked instance from a ground-truth image;
pos = its 0-based instance-level position; the query counts if pos < k and
IoU(box(inst*), gt) >= tau. Only inst* is checked; the denominator is every query.

Generalisations, each a parameter of :func:`outcome` rather than a second code path:
- official: ground truth = the query's source image and its one box;
- multi-positive: ground truth = every (image, box) the expression is exactly true of
  (synthetic benchmark), IoU taken against the answer boxes of inst*'s image;
- image-deduplicated: rank counted in distinct images instead of instances;
- IR@k: the image-level rank only, no box check.

Ties are broken against the query: an instance from a non-GT image with the same
score as inst* counts as ranked ahead of it. A constant-score model therefore scores
0, not whatever the gallery order happens to give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .boxes import pairwise_iou
from .ranking import Hits

KS = (1, 5, 10)
TAUS = (0.5, 0.7, 0.9)


@dataclass(frozen=True)
class Outcome:
    pos: float  # instance-level rank of inst* (inf when no GT image appears in the list)
    image_rank: float  # distinct non-GT images ranked ahead of inst*
    iou: float  # IoU of inst*'s box with the GT box(es) of its image (0 when missing)


MISS = Outcome(math.inf, math.inf, 0.0)


def outcome(hits: Hits, gt: Mapping[int, np.ndarray]) -> Outcome:
    """Where the first ground-truth image shows up in `hits`, and how good its box is.

    `gt` maps each ground-truth image id to its GT boxes [m, 4].
    """
    if len(hits) == 0 or not gt:
        return MISS
    is_gt = np.isin(hits.image_ids, np.fromiter(gt.keys(), dtype=np.int64))
    first = np.flatnonzero(is_gt)
    if first.size == 0:
        return MISS
    i = int(first[0])
    s = hits.scores[i]
    ahead = (hits.scores > s) | ((hits.scores == s) & ~is_gt)
    pos = int(ahead.sum())
    image_rank = len(np.unique(hits.image_ids[ahead]))
    boxes = np.asarray(gt[int(hits.image_ids[i])], dtype=np.float64).reshape(-1, 4)
    iou = float(pairwise_iou(hits.boxes[i : i + 1], boxes).max()) if len(boxes) else 0.0
    return Outcome(float(pos), float(image_rank), iou)


def box_recall(outcomes: list[Outcome], k: int, tau: float, dedup: bool = False) -> float:
    """BR@k(tau) in percent; `dedup` ranks by distinct images instead of instances."""
    if not outcomes:
        return 0.0
    hit = [(o.image_rank if dedup else o.pos) < k and o.iou >= tau for o in outcomes]
    return 100.0 * float(np.mean(hit))


def image_recall(outcomes: list[Outcome], k: int) -> float:
    """IR@k in percent: the GT image among the first k distinct images, box unchecked."""
    if not outcomes:
        return 0.0
    return 100.0 * float(np.mean([o.image_rank < k for o in outcomes]))


def rec_accuracy(pred_boxes: np.ndarray, gt_boxes: np.ndarray, tau: float = 0.5) -> float:
    """REC Acc@tau in percent: one predicted box per expression in its own image."""
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    if len(gt) == 0:
        return 0.0
    ious = np.array([pairwise_iou(p[None], g[None])[0, 0] for p, g in zip(pred, gt, strict=True)])
    return 100.0 * float(np.mean(ious >= tau))


def tir_recall(image_scores: np.ndarray, gt_images: list[set[int]], k: int) -> float:
    """Text-to-image R@k in percent. `image_scores` [Q, I]: CLARE's image score is the max of
    ⟨T, o⟩ over the image's candidates. A query counts if any GT image column ranks < k
    (ties against the query)."""
    scores = np.asarray(image_scores, dtype=np.float64)
    if scores.size == 0 or not gt_images:
        return 0.0
    hits = []
    for row, gts in zip(scores, gt_images, strict=True):
        if not gts:
            hits.append(False)
            continue
        best = max(row[j] for j in gts)
        others = np.ones(len(row), dtype=bool)
        others[list(gts)] = False
        hits.append(int((row[others] >= best).sum()) < k)
    return 100.0 * float(np.mean(hits))
