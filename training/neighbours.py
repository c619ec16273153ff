"""Neighbour naming: a target of its own for the neighbour half of the instance context.

Session 9 found the neighbour term of `context.py` unused: at first the neighbour sum is
noise to every loss, and training shuts its gates before the few relation texts per batch
can pay for it. This term gives it something to be right about from step one, in the same
space the text queries live in.

For each (relation, attribute value) pair, e.g. (left_of, red), a shared linear readout
`w` asks two questions:

- of a matched query's neighbour term c_i: is some object of its image such that the
  instance is <relation> it, and does that object have the value? (exact labels from the
  scene, synthetic data only)
- of a relation text's query vector q: is that the relation, and does its anchor carry
  the value? ("the circle left of a red star": (left_of, red) and (left_of, star))

With one readout for both, c_i and q both learn to point along the same w for the same
fact, so <q, c_i> starts to count the asked facts that hold, which is what the CLIA
score of a relation text must do. Text-free at inference: only the losses change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reir.datasets.synth import COLORS, FILLS, RELATIONS, SHAPES, SIZES, SceneObject, related

VALUES: tuple[tuple[str, str], ...] = (
    *(("shape", v) for v in SHAPES),
    *(("color", v) for v in COLORS),
    *(("size", v) for v in SIZES),
    *(("fill", v) for v in FILLS),
)
FACTS: tuple[tuple[str, str, str], ...] = tuple((r, a, v) for r in RELATIONS for a, v in VALUES)
_INDEX = {f: n for n, f in enumerate(FACTS)}


def scene_facts(objects: Sequence[SceneObject], w: int, h: int) -> np.ndarray:
    """[n, len(FACTS)] in {0, 1}: fact (r, a, v) holds for object i if some other object j
    has attribute a = v and i is <r> j, by the benchmark's own semantics."""
    out = np.zeros((len(objects), len(FACTS)), np.float32)
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            for r in RELATIONS:
                if related(a, b, r, w, h):
                    for attr, v in VALUES:
                        if b.attr(attr) == v:
                            out[i, _INDEX[(r, attr, v)]] = 1.0
    return out


def asked_facts(logic: dict | None) -> np.ndarray | None:
    """[len(FACTS)] in {0, 1}: what a relation text asks of its target's neighbours; None for
    a text without a relation (it asks nothing, and is not a negative for every fact)."""
    rel = (logic or {}).get("relation")
    if not rel:
        return None
    out = np.zeros(len(FACTS), np.float32)
    for attr, v in rel["anchor"].items():
        out[_INDEX[(rel["type"], attr, v)]] = 1.0
    return out


class NeighbourReadout(nn.Module):
    """One per decoder layer: the shared readout of neighbour terms and text queries."""

    def __init__(self, d: int):
        super().__init__()
        self.read = nn.Linear(d, len(FACTS))

    def forward(self, neighbours: Tensor, facts: Tensor, queries: Tensor, asked: Tensor) -> Tensor:
        """neighbours [N, d] (matched queries' neighbour terms), facts [N, F]; queries [T, d]
        (relation texts), asked [T, F]. Mean binary cross-entropy of each side, summed."""
        loss = neighbours.sum() * 0.0 + queries.sum() * 0.0  # keeps the graph when a side is empty
        if len(neighbours):
            loss = loss + F.binary_cross_entropy_with_logits(self.read(neighbours), facts)
        if len(queries):
            loss = loss + F.binary_cross_entropy_with_logits(self.read(queries), asked)
        return loss


def text_facts(logics: Sequence[dict | None], device: torch.device) -> tuple[Tensor, Tensor]:
    """(indices of the relation texts, their asked facts [T, F])."""
    rows = [(k, f) for k, f in ((k, asked_facts(g)) for k, g in enumerate(logics)) if f is not None]
    index = torch.tensor([k for k, _ in rows], dtype=torch.long, device=device)
    facts = np.stack([f for _, f in rows]) if rows else np.zeros((0, len(FACTS)), np.float32)
    return index, torch.from_numpy(facts).to(device)
