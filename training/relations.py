"""Relation slots: the anchors around an instance, in dimensions of their own.

Across images, "the circle left of a red star" must be answered by one dot product with the
circle's own embedding. The instance context (context.py) adds learned neighbour sums into
the same dimensions the attributes live in; training shut its gates, because the query had
no way to ask for what they hold (benchmarks/results/synth-history.md, Sessions 9 and 10).

Here the instance embedding is extended by one slot per spatial relation r (left of, right
of, above, below, next to). Slot r of instance i sums, over the other queries j of its
image that lie where r says (a soft gate on the two boxes) weighted by j's objectness, j's
*anchor code* a(j), a projection of j's own instance embedding, which already says what j
is. The text side mirrors it: a head reads which relation the expression uses (p, with a
"none" class), and attention over its tokens pools its anchor phrase, whose query (the
layer's MORE) is coded the same way (a_t). The query puts gamma * p_r * a_t in slot r, so

    <query, embedding> = <T, o_i> + gamma * sum_r p_r * sum_j g_r(i, j) w_j <a_t, a(j)>

counts the neighbours on the asked side that fit the anchor. The conjunction ("a red star",
not "something red and something star-shaped") is decided per neighbour by <a_t, a(j)>.
Still one vector per instance, computed without text, and one dot product per query: the
gallery stays offline and the index is a plain inner-product index, only wider.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reir.datasets.synth import RELATIONS  # the slots: one per relation type of the data, in its order

from .transformer import MLP

# Where each gate opens at init, in fractions of the image side: centres 0.1 apart for the
# four directions, boxes at most 0.06 apart for next_to (datasets/synth/logic.py uses the same
# margins). Both the thresholds and the softness are learned.
INIT_THRESHOLDS = (0.10, 0.10, 0.10, 0.10, -0.06)
INIT_SOFTNESS = 0.02
INIT_NONE_LOGIT = 4.0  # p(none) = e^4 / (e^4 + 5) ~ 0.92 at init


def relation_geometry(boxes: Tensor) -> Tensor:
    """[B, Q, 4] normalised cxcywh -> [B, Q(i), Q(j), R]: how far j lies on each relation's
    side of i (positive: beyond the gate's threshold means 'i <relation> j')."""
    cx, cy, w, h = boxes.unbind(-1)
    dx = cx[:, None, :] - cx[:, :, None]  # j right of i: > 0
    dy = cy[:, None, :] - cy[:, :, None]  # j below i: > 0 (image y points down)
    gap_x = (dx.abs() - (w[:, None, :] + w[:, :, None]) / 2).clamp(min=0)
    gap_y = (dy.abs() - (h[:, None, :] + h[:, :, None]) / 2).clamp(min=0)
    # i left of j <=> j right of i; i above j <=> j below i; next to: the larger gap is small.
    return torch.stack([dx, -dx, dy, -dy, -torch.maximum(gap_x, gap_y)], -1)


class AnchorCode(nn.Module):
    """One per decoder layer: what an instance embedding (or an anchor's query) says about
    what it is, in `anchor_dim` dimensions. A projection P shared by both sides, so that at
    init <P q, P o> ~ <q, o>: the trained REC space already tells a "red star" from the
    rest (AUC 0.99 for standalone anchor phrases on the v8 recipe), and the anchor term
    starts from that instead of from two random maps. A zero-initialised MLP refines it."""

    def __init__(self, d: int, anchor_dim: int):
        super().__init__()
        self.project = nn.Linear(d, anchor_dim, bias=False)
        nn.init.normal_(self.project.weight, std=anchor_dim**-0.5)  # E[P^T P] = I
        self.refine = MLP(d, d, anchor_dim, 2)
        nn.init.zeros_(self.refine.layers[-1].weight)
        nn.init.zeros_(self.refine.layers[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(x) + self.refine(x)


class RelationSlots(nn.Module):
    """One per decoder layer: instance embeddings [B, Q, d] -> (slots [B, Q, R * anchor_dim],
    anchor codes [B, Q, anchor_dim])."""

    def __init__(self, d: int, anchor_dim: int):
        super().__init__()
        self.code = AnchorCode(d, anchor_dim)
        self.threshold = nn.Parameter(torch.tensor(INIT_THRESHOLDS))
        self.log_softness = nn.Parameter(torch.full((len(RELATIONS),), math.log(INIT_SOFTNESS)))
        # Set by the trainer where the anchor and relation-type terms label the slots
        # (relation_loss.py): the codes and p then learn from those labels only, and the score
        # reaches only gamma and the gates. Through the score, CLIA first sees the slots as
        # noise and shrinks them: with it, the anchor term stalled near predicting 0 (on the
        # synth recipe, anchor AUC 0.67 after 500 steps; without it, 0.985 after 150).
        self.supervised = False

    def gates(self, boxes: Tensor) -> Tensor:
        """[B, Q(i), Q(j), R] in (0, 1): does j lie where relation r of i looks?"""
        return torch.sigmoid((relation_geometry(boxes) - self.threshold) / self.log_softness.exp())

    def forward(self, embeddings: Tensor, boxes: Tensor, objectness: Tensor) -> tuple[Tensor, Tensor]:
        """Boxes and objectness only weigh (detached): retrieval losses cannot bend localisation."""
        b, q, _ = embeddings.shape
        codes = self.code(embeddings)
        others = 1.0 - torch.eye(q, dtype=codes.dtype, device=codes.device)
        weight = torch.sigmoid(objectness.detach())[:, None, :] * others  # [B, Q(i), Q(j)]
        gates = self.gates(boxes.detach()) * weight[..., None]
        summed = codes.detach() if self.supervised else codes
        slots = torch.einsum("bijr,bjk->birk", gates, summed).reshape(b, q, -1)
        return slots, codes


class TokenPool(nn.Module):
    """Attention pooling over the text tower's tokens, L2 normalised like the sentence
    embedding (so the layers' MORE heads read it as a phrase). Two of them: one finds the
    anchor phrase (mean pooling mixes target and anchor words: 'the red circle left of the
    blue star' and 'the blue circle left of the red star' are close), one the relation words
    (in a mean over 15 tokens "above" and "below" hardly differ)."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """hidden [B, L, D], mask [B, L] -> [B, D]."""
        scores = self.score(hidden).squeeze(-1).masked_fill(mask == 0, torch.finfo(hidden.dtype).min)
        return F.normalize(torch.einsum("bl,bld->bd", torch.softmax(scores, -1), hidden), dim=-1)


class RelationQuery(nn.Module):
    """The text side: which relation a text asks (logits [B, R + 1], last: none, from the
    relation pool) and, per decoder layer, its anchor's code: the layer's AnchorCode of the
    layer's query for the anchor pool. The slot vector puts gamma * p_r * a_t in slot r."""

    def __init__(self, text_dim: int):
        super().__init__()
        # LayerNorm first: the pooled tokens are unit-norm, so a plain Linear's logits would
        # move ~20x slower per step. "none" starts likely (p ~ 0.9), so the slots start closed
        # and open as the relation-type term teaches p.
        self.relation = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, len(RELATIONS) + 1))
        with torch.no_grad():
            self.relation[1].bias[-1] = INIT_NONE_LOGIT
        self.gamma = nn.Parameter(torch.tensor(1.0))
        self.supervised = False  # see RelationSlots.supervised

    def slots(self, logits: Tensor, anchor: Tensor) -> Tensor:
        """logits [B, R + 1], one layer's anchor codes [B, A] -> [B, R * A]."""
        p = torch.softmax(logits, -1)[:, : len(RELATIONS)]
        if self.supervised:
            p, anchor = p.detach(), anchor.detach()
        return self.gamma * (p[:, :, None] * anchor[:, None, :]).flatten(1)
