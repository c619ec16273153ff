"""Counterfactual expressions: one field of a true logical form changed so that it is false
of its target.

Random batches rarely hold the negatives a relation needs: for "the red star left of the
blue circle", the instances that must rank below the answer are red stars with a blue
circle on their *other* side, or a green one on the right. A counterfactual of the
target's own expression ("the red star right of the blue circle") is such a negative for
the same instance, so CLIA learns what each word of the relation changes. Exact semantics
(`satisfying`) label it over the whole batch, so it stays honest where it happens to be
true elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from .logic import H_REGIONS, RELATIONS, V_REGIONS, Logic, satisfying
from .scene import COLORS, FILLS, SHAPES, SIZES, SceneObject

VALUES = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "fill": FILLS}


def _edits(logic: Logic) -> list[tuple[str, ...]]:
    """Every one-field change this form allows, as (part, key)."""
    edits: list[tuple[str, ...]] = []
    rel = logic.get("relation")
    if rel:
        edits.append(("relation", "type"))
        edits += [("anchor", k) for k in rel["anchor"]]
    for k in logic.get("location") or {}:
        edits.append(("location", k))
    sup = logic.get("superlative")
    if sup:
        edits.append(("superlative", "descending"))
        if sup["by"] != "area" or int(sup.get("rank", 1)) == 1:
            edits.append(("superlative", "by"))
    if not edits:  # a bare attribute expression: change the target itself
        edits = [("target", k) for k in logic["target"]]
    return edits


def _other(rng: np.random.Generator, options: Sequence, current) -> object:
    rest = [o for o in options if o != current]
    return rest[int(rng.integers(len(rest)))]


def _apply(logic: Logic, edit: tuple[str, ...], rng: np.random.Generator) -> Logic:
    out = copy.deepcopy(logic)
    part, key = edit
    if part == "relation":
        out["relation"]["type"] = _other(rng, RELATIONS, out["relation"]["type"])
    elif part in ("anchor", "target"):
        desc = out["relation"]["anchor"] if part == "anchor" else out["target"]
        desc[key] = _other(rng, VALUES[key], desc[key])
    elif part == "location":
        regions = H_REGIONS if key == "h" else V_REGIONS
        out["location"][key] = _other(rng, regions, out["location"][key])
    elif key == "descending":
        out["superlative"]["descending"] = not out["superlative"].get("descending", False)
    else:  # ranks past the first are phrased by side ("the second from the left"): x or y only
        keys = ("x", "y", "area") if int(out["superlative"].get("rank", 1)) == 1 else ("x", "y")
        out["superlative"]["by"] = _other(rng, keys, out["superlative"]["by"])
    return out


def counterfactual(
    logic: Logic, objects: Sequence[SceneObject], w: int, h: int, target: int, rng: np.random.Generator, tries: int = 4
) -> Logic | None:
    """A form one field away from `logic` that is false of objects[target], or None."""
    edits = _edits(logic)
    for _ in range(tries):
        cand = _apply(logic, edits[int(rng.integers(len(edits)))], rng)
        if target not in satisfying(cand, objects, w, h):
            return cand
    return None
