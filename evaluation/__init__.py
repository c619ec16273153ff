"""REIR metrics (numpy only): BR@k(tau), IR@k, REC Acc, TIR R@k and the report."""

from .boxes import box_area, pairwise_iou
from .ranking import GalleryArrays, Hits, rank_gallery
from .report import Report, evaluate, stratum
from .retrieval import KS, MISS, TAUS, Outcome, box_recall, image_recall, outcome, rec_accuracy, tir_recall

__all__ = [
    "KS",
    "MISS",
    "TAUS",
    "GalleryArrays",
    "Hits",
    "Outcome",
    "Report",
    "box_area",
    "box_recall",
    "evaluate",
    "image_recall",
    "outcome",
    "pairwise_iou",
    "rank_gallery",
    "rec_accuracy",
    "stratum",
    "tir_recall",
]
