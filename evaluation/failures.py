"""Why a top-1 result is wrong, on data where every instance carries its attributes and every
expression its logical form (the synthetic benchmark).

A BR@1 number says how often retrieval fails, not why. For every query whose top-1 instance
is not a multi-positive hit at IoU 0.5, the top-1 box is put in one of three classes:

- `no instance`: it overlaps no instance of its image with IoU >= 0.5 (a detection failure);
- `the anchor`: (relation expressions) it is an instance with the attributes of the
  expression's anchor, not of its target ("the square under the navy triangle" -> a navy
  triangle): the embedding matched the wrong noun phrase;
- `wrong attributes`: any other instance whose own shape/colour/size/fill differ from the
  target's description (the embedding does not say what the object is);
- `no anchor`: (relation expressions) the instance has the target's attributes, but no
  other instance of its image fits the anchor's description: the relation part of the score
  did not count against it;
- `wrong context`: the instance has the target's attributes but not its location, relation
  or rank (the embedding says what the object is, not where or next to what; for relations:
  an anchor is in the image, on the wrong side or with a location that fails).

The split between `wrong attributes` and the last two tells whether relation expressions
fail for lack of appearance or of context in the instance embedding; `no anchor` against
`wrong context` whether the context is missing or only imprecise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from reir.datasets.dataset import Dataset, Expression

from .boxes import MATCH_IOU, pairwise_iou
from .ranking import Hits

KINDS = ("no instance", "the anchor", "wrong attributes", "no anchor", "wrong context")


def diagnosable(dataset: Dataset, exprs: list[Expression]) -> bool:
    """True when every expression has a logical form and every instance its attributes."""
    return (
        bool(exprs)
        and all(e.logic and e.answers is not None for e in exprs)
        and all(i.attributes for i in dataset.instances.values())
    )


def top1_failures(predictions: Mapping[int, Hits], dataset: Dataset, exprs: list[Expression]) -> dict[str, dict]:
    """Per expression type (and `all`): queries, top-1 misses, and the share of each kind of
    miss in percent of the misses. A query with no hits is counted as a miss of no kind."""
    by_image = dataset.instances_by_image()
    counts: dict[str, dict[str, int]] = {}
    for e in exprs:
        kind = _classify(predictions.get(e.id), e, dataset, by_image)
        for group in (e.type or "unknown", "all"):
            c = counts.setdefault(group, {"n": 0, "misses": 0, **dict.fromkeys(KINDS, 0)})
            c["n"] += 1
            if kind != "hit":
                c["misses"] += 1
                if kind in KINDS:
                    c[kind] += 1
    out = {}
    for group in sorted(counts, key=lambda g: (g == "all", g)):
        c = counts[group]
        row: dict[str, float] = {"n": float(c["n"]), "misses": float(c["misses"])}
        for k in KINDS:
            row[k] = 100.0 * c[k] / c["misses"] if c["misses"] else 0.0
        out[group] = row
    return out


def _classify(hits: Hits | None, e: Expression, dataset: Dataset, by_image: Mapping[int, list]) -> str:
    if hits is None or len(hits) == 0:
        return "empty"
    image = int(hits.image_ids[0])
    box = hits.boxes[:1]
    answers = [dataset.instances[a] for a in e.answers or () if dataset.instances[a].image_id == image]
    if answers and pairwise_iou(box, np.asarray([a.box for a in answers], dtype=np.float64)).max() >= MATCH_IOU:
        return "hit"
    insts = by_image.get(image, [])
    if not insts:
        return "no instance"
    iou = pairwise_iou(box, np.asarray([i.box for i in insts], dtype=np.float64))[0]
    if iou.max() < MATCH_IOU:
        return "no instance"
    top = insts[int(iou.argmax())]
    attrs = top.attributes or {}
    logic = e.logic or {}
    anchor = (logic.get("relation") or {}).get("anchor")
    if _fits(attrs, logic.get("target", {})):
        if anchor is not None and not any(i.id != top.id and _fits(i.attributes or {}, anchor) for i in insts):
            return "no anchor"
        return "wrong context"
    return "the anchor" if anchor and _fits(attrs, anchor) else "wrong attributes"


def _fits(attrs: dict, desc: dict) -> bool:
    return all(attrs.get(k) == v for k, v in desc.items())
