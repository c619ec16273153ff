"""Choosing a logical form that picks out one target object in its scene.

Constructs, as in REIRCOCO-style data: minimal distinguishing attributes, absolute
location, a relation to another object, superlatives/ordinals, and *long*
compositional forms (every attribute + location + a relation to a fully described
anchor). The long ones are what makes retrieval hard: they are true in very few
gallery images, as each REIRCOCO expression is.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

from .logic import Logic, region_of, related, satisfying
from .scene import ATTRIBUTES, SceneObject

CONSTRUCT_WEIGHTS = {"attribute": 0.17, "location": 0.11, "relation": 0.15, "superlative": 0.12, "long": 0.45}
FALLBACK = ("attribute", "location", "relation", "superlative", "long")


@functools.cache
def _combinations(names: tuple[str, ...], k: int) -> list[tuple[str, ...]]:
    return list(itertools.combinations(names, k))


def _subsets(rng: np.random.Generator, min_size: int = 0, exclude: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Attribute subsets, smallest first, in random order within a size."""
    names = tuple(a for a in ATTRIBUTES if a not in exclude)
    out: list[tuple[str, ...]] = []
    for k in range(min_size, len(names) + 1):
        group = _combinations(names, k)
        if len(group) == 1:
            out.append(group[0])
            continue
        out.extend(group[i] for i in rng.permutation(len(group)))
    return out


def _desc(o: SceneObject, attrs: Sequence[str]) -> dict[str, str]:
    return {a: o.attr(a) for a in ATTRIBUTES if a in attrs}


class Composer:
    def __init__(self, objs: Sequence[SceneObject], w: int, h: int, rng: np.random.Generator):
        self.objs, self.w, self.h, self.rng = objs, w, h, rng

    def unique(self, logic: Logic, target: int) -> bool:
        return satisfying(logic, self.objs, self.w, self.h) == [target]

    def describe(self, target: int, construct: str) -> Logic | None:
        for c in (construct, *[f for f in FALLBACK if f != construct]):
            logic = getattr(self, c)(target)
            if logic is not None:
                return logic
        return None

    # -- constructs ---------------------------------------------------------------
    def attribute(self, t: int) -> Logic | None:
        o = self.objs[t]
        for subset in _subsets(self.rng, 1):
            logic = {"target": _desc(o, subset)}
            if self.unique(logic, t):
                extra = [a for a in ATTRIBUTES if a not in subset]
                if extra and self.rng.random() < 0.3:  # people often over-specify
                    logic["target"] = _desc(o, (*subset, extra[int(self.rng.integers(len(extra)))]))
                return logic
        return None

    def location(self, t: int) -> Logic | None:
        o = self.objs[t]
        hx, vy = region_of(o, self.w, self.h)
        options = [{"h": hx, "v": vy}, {"h": hx}, {"v": vy}]
        for i in self.rng.permutation(3):
            for subset in _subsets(self.rng, 0):
                logic = {"target": _desc(o, subset), "location": options[i]}
                if self.unique(logic, t):
                    return logic
        return None

    def _anchor_desc(self, j: int) -> dict[str, str] | None:
        for subset in _subsets(self.rng, 1):
            if satisfying({"target": _desc(self.objs[j], subset)}, self.objs, self.w, self.h) == [j]:
                return _desc(self.objs[j], subset)
        return None

    def _relations(self, t: int) -> list[tuple[int, str]]:
        pairs = []
        for j in range(len(self.objs)):
            if j == t:
                continue
            for rel in ("left_of", "right_of", "above", "below", "next_to"):
                if related(self.objs[t], self.objs[j], rel, self.w, self.h):
                    pairs.append((j, rel))
        order = self.rng.permutation(len(pairs)) if pairs else []
        return [pairs[i] for i in order]

    def relation(self, t: int) -> Logic | None:
        o = self.objs[t]
        for j, rel in self._relations(t):
            anchor = self._anchor_desc(j)
            if anchor is None:
                continue
            for subset in _subsets(self.rng, 0):
                logic = {"target": _desc(o, subset), "relation": {"type": rel, "anchor": anchor}}
                if self.unique(logic, t):
                    return logic
        return None

    def superlative(self, t: int) -> Logic | None:
        o = self.objs[t]
        keys = [("area", True), ("area", False), ("x", False), ("x", True), ("y", False), ("y", True)]
        for i in self.rng.permutation(len(keys)):
            by, desc = keys[i]
            ranks = [1, 2] if self.rng.random() < 0.3 and by != "area" else [1]
            for rank in ranks:
                sup = {"by": by, "descending": desc, "rank": rank}
                exclude = ("size",) if by == "area" else ()
                for subset in _subsets(self.rng, 0, exclude):
                    logic = {"target": _desc(o, subset), "superlative": sup}
                    if not self.unique(logic, t):
                        continue
                    # A superlative that the attributes alone already settle is an attribute expression.
                    if subset and self.unique({"target": _desc(o, subset)}, t):
                        break
                    return logic
        return None

    def long(self, t: int) -> Logic | None:
        o = self.objs[t]
        hx, vy = region_of(o, self.w, self.h)
        for j, rel in self._relations(t):
            logic = {
                "target": _desc(o, ATTRIBUTES),
                "location": {"h": hx, "v": vy},
                "relation": {"type": rel, "anchor": _desc(self.objs[j], ATTRIBUTES)},
            }
            if self.unique(logic, t):
                return logic
        # No relation to anyone (a lone object): every attribute + the location is still rare.
        logic = {"target": _desc(o, ATTRIBUTES), "location": {"h": hx, "v": vy}}
        return logic if self.unique(logic, t) else None


_CUMULATIVE = np.cumsum(list(CONSTRUCT_WEIGHTS.values())) / sum(CONSTRUCT_WEIGHTS.values())


def choose_construct(rng: np.random.Generator) -> str:
    return list(CONSTRUCT_WEIGHTS)[int(np.searchsorted(_CUMULATIVE, rng.random(), side="right"))]
