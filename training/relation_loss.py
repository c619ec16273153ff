"""The two terms that teach the relation slots (relations.py) what to hold, on data with
logical forms (the synthetic benchmark).

- **anchor**: for each relation text, the dot product of its anchor a_t with every query's
  anchor code a(j) in its image should be 1 where the query stands for an object that fits
  the anchor's description ("a red star"), else 0. A squared error, not a sigmoid: the slot
  *sums* <a_t, a(j)> over neighbours, so a neighbour that does not fit must add about 0,
  not a large negative logit, and one that fits about 1.
- **relation type**: which slot the text asks (left_of ... next_to, or none) from its
  relation logits: cross-entropy.

CLIA alone would have to discover both through the retrieval score, where the slots are at
first noise (the instance context's gates shut that way: synth-history.md, Session 9). These terms
give them exact targets from step one. Real data without logical forms skips them; CLIA
still trains the slots end to end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from reir.datasets.synth import SceneObject, matches

from .relations import RELATIONS

NO_RELATION = len(RELATIONS)  # the relation logits' last class
UNKNOWN = -1  # a text without a logical form: no relation-type label


def relation_targets(texts: Sequence[tuple[dict | None, Sequence[SceneObject]]]) -> tuple[list[list[int]], list[int]]:
    """Per text (its logical form, its image's objects): the objects that fit its anchor's
    description (empty for a text without a relation) and its relation's slot index
    (NO_RELATION without one, UNKNOWN without a logical form)."""
    anchors, types = [], []
    for logic, objects in texts:
        rel = (logic or {}).get("relation")
        anchors.append([j for j, o in enumerate(objects) if matches(o, rel["anchor"])] if rel else [])
        types.append(UNKNOWN if logic is None else RELATIONS.index(rel["type"]) if rel else NO_RELATION)
    return anchors, types


def anchor_loss(anchor: Tensor, codes: Tensor, owner: Tensor, objects: list[list[int]]) -> Tensor:
    """anchor [T, A] (relation texts' a_t), codes [T, Q, A] (their images' anchor codes),
    owner [T, Q, N] (which queries stand for which object), objects: per text its anchor
    objects. Squared error of <a_t, a(j)> against 'j stands for an anchor', summed over the
    queries, averaged over the texts."""
    fits = torch.zeros(owner.shape[0], owner.shape[2], dtype=owner.dtype, device=owner.device)
    for t, objs in enumerate(objects):
        fits[t, objs] = 1.0
    target = (owner * fits[:, None, :]).amax(-1)  # [T, Q]
    pred = torch.einsum("ta,tqa->tq", anchor, codes)
    return ((pred - target) ** 2).sum(-1).mean()


def relation_type_loss(logits: Tensor, types: Sequence[int]) -> Tensor:
    """Cross-entropy of the relation logits [T, R + 1] over the texts with a logical form."""
    labels = torch.as_tensor(types, dtype=torch.long, device=logits.device)
    known = labels != UNKNOWN
    if not bool(known.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], labels[known])
