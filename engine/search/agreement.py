"""How far a search agrees with the exact ranking, and the self-check that sizes the
candidate set until it agrees.

Agreement is measured the way a user sees results: image level, the best instance per
image (top-1 image, overlap of the top-10 images), and instance level (recall@10). Scores
within TIE of the exact list's are ties: stored f16 vectors and the summation order of a
matrix product against a matrix-vector product differ in the last bits, and which of two
equal scores comes first is not an error.

The gallery runs `calibrate` whenever it (re)builds its index or has doubled since the
last run: a held-out part of its query sample is searched exactly and through the index
with growing candidate sets (the candidate design's schedule) until the targets hold,
every stage-1 budget doubled (MARGIN).
The targets sit above what the project promises (top-1 0.99, top-10 0.98), so a sample's
noise does not eat the margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from reir.engine.search.candidates import Setting

TIE = 1e-5  # relative
TARGETS = {"top1": 0.995, "top10": 0.99, "recall10": 0.99}
# The sample's expressions come from training data; a deployment's queries aim at its own
# images, whose top scores crowd closer, and needed up to twice the stage-1 candidates for
# the same agreement (measured at 250k instances, benchmarks/results): the margin.
MARGIN = 2
CHECK_QUERIES = 512


@dataclass
class Agreement:
    top1: float  # share of queries whose first image is the exact first (or ties it)
    top10: float  # mean overlap of the top-10 images with the exact top 10 (ties count)
    recall10: float  # mean overlap of the top-10 instances with the exact top 10 (ties count)
    queries: int

    def meets(self, targets: dict[str, float]) -> bool:
        return all(getattr(self, k) >= v for k, v in targets.items())

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def per_image(rows: np.ndarray, scores: np.ndarray, images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best instance of each image, best first: (rows, scores) of at most k images.
    `rows`/`scores` are sorted best first."""
    _, first = np.unique(images[rows], return_index=True)
    first = np.sort(first)[:k]
    return rows[first], scores[first]


def _overlap(found: np.ndarray, found_scores: np.ndarray, exact: np.ndarray, exact_scores: np.ndarray) -> float:
    """|found ∩ exact| / |exact|, counting a found item that ties the exact list's last score."""
    if len(exact) == 0:
        return 1.0
    floor = exact_scores[-1] - TIE * max(1.0, abs(float(exact_scores[-1])))
    hits = sum(1 for f, s in zip(found, found_scores, strict=True) if f in set(exact.tolist()) or s >= floor)
    return min(hits, len(exact)) / len(exact)


def query_agreement(found: tuple, exact: tuple, images: np.ndarray, k: int = 10) -> tuple[float, float, float]:
    """(top-1, top-10 images, recall@10) of one query; `found`, `exact`: (rows, exact scores)
    best first, at least k x (instances per image) long where image figures should be complete."""
    (fr, fs), (er, es) = found, exact
    fi, fis = per_image(fr, fs, images, k)
    ei, eis = per_image(er, es, images, k)
    if len(ei) == 0:
        top1 = 1.0
    else:
        tie = eis[0] - TIE * max(1.0, abs(float(eis[0])))
        top1 = float(len(fi) > 0 and (images[fi[0]] == images[ei[0]] or fis[0] >= tie))
    return top1, _overlap(images[fi], fis, images[ei], eis), _overlap(fr[:k], fs[:k], er[:k], es[:k])


def agreement(found: list, exact: list, images: np.ndarray, k: int = 10) -> Agreement:
    """Mean agreement over queries (see query_agreement)."""
    per = np.array([query_agreement(f, e, images, k) for f, e in zip(found, exact, strict=True)]).reshape(-1, 3)
    return Agreement(*map(float, per.mean(0)), len(found))


def calibrate(
    search: Callable[[np.ndarray, Setting], tuple[np.ndarray, np.ndarray]],
    exact: list,
    queries: np.ndarray,
    images: np.ndarray,
    schedule: Sequence[Setting],
    targets: dict[str, float] = TARGETS,
    margin: float = MARGIN,
) -> dict:
    """The first setting of `schedule` whose search meets `targets` on `queries`, with its
    stage-1 budget then multiplied by `margin` (the design's own, MARGIN by default).
    `search(q, setting) -> (rows, exact scores)` best first; `exact`: the exact top rows
    per query. The result records what was measured, met or not: {"setting", agreement
    figures, "met", "p50_ms", "tried", ...}."""
    t0 = time.perf_counter()
    tried = []
    budget = np.array([(1 - targets[m]) * len(queries) for m in ("top1", "top10", "recall10")])
    chosen, figures = None, None
    for setting in schedule:
        trial = setting.grown(margin)
        missed = np.zeros(3)
        for i, q in enumerate(queries):
            missed += 1 - np.array(query_agreement(search(q, trial), exact[i], images))
            if (missed > budget).any():  # cannot meet the targets any more: the next setting
                break
        if i < len(queries) - 1:
            tried.append({**setting.as_dict(), "stopped_after": i + 1})
            continue
        a = Agreement(*(1 - missed / len(queries)), len(queries))
        tried.append({**setting.as_dict(), **a.as_dict()})
        chosen, figures = trial, a
        if a.meets(targets):
            break
    if figures is None or not figures.meets(targets):  # nothing met them: the last setting's figures, for the record
        chosen = schedule[-1].grown(margin)
        figures = agreement([search(q, chosen) for q in queries], exact, images)
        tried[-1] = {**schedule[-1].as_dict(), **figures.as_dict()}
    lat = []
    for q in queries[:64]:
        t = time.perf_counter()
        search(q, chosen)
        lat.append(time.perf_counter() - t)
    return {
        "setting": chosen.as_dict(),
        **figures.as_dict(),
        "p50_ms": round(1000 * float(np.median(lat)), 3),
        "margin": margin,
        "met": figures.meets(targets),
        "targets": targets,
        "tried": tried,
        "seconds": round(time.perf_counter() - t0, 2),
    }
