"""Logical forms of synthetic expressions and their exact semantics.

A logical form is a JSON dict::

    {"target": {"shape"?, "color"?, "size"?, "fill"?},          # attribute constraints
     "location": {"h"?: left|center|right, "v"?: top|middle|bottom} | None,
     "relation": {"type": left_of|right_of|above|below|next_to,
                  "anchor": {attribute constraints}} | None,
     "superlative": {"by": x|y|area, "descending": bool, "rank": 1..3} | None}

:func:`satisfying` returns every object of a scene the form is true of. The
generator only emits a form when it is true of exactly its target in its own
image; the benchmark then evaluates the same function over every gallery image,
which gives the exact multi-positive ground truth. All thresholds are margins
(fractions of the image side), so "left of" is never decided by one pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .scene import SceneObject

REL_GAP = 0.10  # left_of/right_of/above/below: centres at least this far apart
NEXT_TO_GAP = 0.06  # next_to: boxes at most this far apart (0 when they touch/overlap)
ORDER_GAP = 0.05  # superlatives by position: neighbours at least this far apart
AREA_RATIO = 1.3  # superlatives by area: neighbours differ by at least this factor

RELATIONS = ("left_of", "right_of", "above", "below", "next_to")
H_REGIONS = ("left", "center", "right")
V_REGIONS = ("top", "middle", "bottom")

Logic = dict[str, Any]


def matches(o: SceneObject, desc: dict[str, str]) -> bool:
    return all(o.attr(k) == v for k, v in desc.items())


def region_of(o: SceneObject, w: int, h: int) -> tuple[str, str]:
    hx = H_REGIONS[min(2, int(3 * o.cx / w))]
    vy = V_REGIONS[min(2, int(3 * o.cy / h))]
    return hx, vy


def in_location(o: SceneObject, loc: dict[str, str], w: int, h: int) -> bool:
    hx, vy = region_of(o, w, h)
    return loc.get("h", hx) == hx and loc.get("v", vy) == vy


def related(a: SceneObject, b: SceneObject, rel: str, w: int, h: int) -> bool:
    """Is `a` <rel> `b`?"""
    if rel == "left_of":
        return b.cx - a.cx >= REL_GAP * w
    if rel == "right_of":
        return a.cx - b.cx >= REL_GAP * w
    if rel == "above":
        return b.cy - a.cy >= REL_GAP * h
    if rel == "below":
        return a.cy - b.cy >= REL_GAP * h
    if rel == "next_to":
        gx = max(0, max(a.box[0], b.box[0]) - min(a.box[2], b.box[2]))
        gy = max(0, max(a.box[1], b.box[1]) - min(a.box[3], b.box[3]))
        return max(gx, gy) <= NEXT_TO_GAP * max(w, h)
    raise ValueError(f"unknown relation {rel!r}")


def _key(o: SceneObject, by: str) -> float:
    if by == "x":
        return o.cx
    if by == "y":
        return o.cy
    if by == "area":
        return math.log(o.area)
    raise ValueError(f"unknown superlative key {by!r}")


def has_rank(i: int, cands: Sequence[int], objs: Sequence[SceneObject], sup: dict, w: int, h: int) -> bool:
    """Is object i unambiguously the rank-th among `cands` by sup["by"]?"""
    by, desc, rank = sup["by"], sup.get("descending", False), int(sup.get("rank", 1))
    gap = math.log(AREA_RATIO) if by == "area" else ORDER_GAP * (w if by == "x" else h)
    sign = -1.0 if desc else 1.0
    ki = sign * _key(objs[i], by)
    before = 0
    for j in cands:
        if j == i:
            continue
        kj = sign * _key(objs[j], by)
        if abs(kj - ki) < gap:
            return False  # too close to call: neither is "the second from the left"
        before += kj < ki
    return before == rank - 1


def satisfying(logic: Logic, objs: Sequence[SceneObject], w: int, h: int) -> list[int]:
    """Indices of every object in the scene the logical form is true of."""
    cands = [i for i, o in enumerate(objs) if matches(o, logic["target"])]
    loc = logic.get("location")
    if loc:
        cands = [i for i in cands if in_location(objs[i], loc, w, h)]
    rel = logic.get("relation")
    if rel:
        anchors = [j for j, o in enumerate(objs) if matches(o, rel["anchor"])]
        cands = [i for i in cands if any(j != i and related(objs[i], objs[j], rel["type"], w, h) for j in anchors)]
    sup = logic.get("superlative")
    if sup:
        cands = [i for i in cands if has_rank(i, cands, objs, sup, w, h)]
    return cands


def expression_type(logic: Logic) -> str:
    """The dominant construct, used to break reports down."""
    if logic.get("superlative"):
        return "superlative"
    if logic.get("relation"):
        return "relation"
    if logic.get("location"):
        return "location"
    return "attribute"


_H_MIRROR = {"left": "right", "right": "left", "center": "center"}
_REL_MIRROR = {"left_of": "right_of", "right_of": "left_of"}


def mirror_logic(logic: Logic) -> Logic:
    """The logical form that is true of the horizontally flipped scene (left <-> right)."""
    out = dict(logic)
    if logic.get("location") and "h" in logic["location"]:
        out["location"] = {**logic["location"], "h": _H_MIRROR[logic["location"]["h"]]}
    if logic.get("relation"):
        rel = logic["relation"]
        out["relation"] = {**rel, "type": _REL_MIRROR.get(rel["type"], rel["type"])}
    sup = logic.get("superlative")
    if sup and sup["by"] == "x":
        out["superlative"] = {**sup, "descending": not sup.get("descending", False)}
    return out


def mirror_object(o: SceneObject, width: int) -> SceneObject:
    x1, y1, x2, y2 = o.box
    return SceneObject(o.shape, o.color, o.size, o.fill, (width - x2, y1, width - x1, y2))


def mirror_object_vertically(o: SceneObject, height: int) -> SceneObject:
    x1, y1, x2, y2 = o.box
    return SceneObject(o.shape, o.color, o.size, o.fill, (x1, height - y2, x2, height - y1))
