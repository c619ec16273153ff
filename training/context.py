"""Instance context: what lies around an instance, written into its embedding.

Across images a query such as "the circle left of a red star" must be answered by one dot
product with the circle's own embedding, so that embedding has to say what is to its right.
Decoder self-attention mixes neighbours, but softmax attention averages: one red star
among twenty-nine other queries, background included, is diluted, and "is there any red
star to my right" is an OR over objects, not an average.

Here each of `slots` learned relations gates every other query by pairwise box geometry
(a sigmoid, not a softmax: a slot can hold any number of neighbours) and by that query's
objectness (background and duplicate queries count for little). Each slot sums its
neighbours' projected states; the sums, and the instance's own box, are projected back and
added to the instance embedding. The output projections start at zero, so a new model
starts from the plain decoder state. Text-free and per image: galleries still index offline.

Measured on the CPU recipe, the own-box term carries the head's whole gain, and training
closes the neighbour gates: zeroing the neighbour term of the trained v8 model changes
nothing (`probes/context.py`, benchmarks/results/synth-history.md "Session 9"). A target of its own
(`neighbours.py`) keeps the gates open; the queries have yet to learn to read it ("Session 10").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .transformer import MLP, box_sine, pairwise_geometry


class InstanceContext(nn.Module):
    def __init__(self, d: int, slots: int, width: int = 32, hidden: int = 64):
        super().__init__()
        self.slots, self.width, self.d = slots, width, d
        self.gate = MLP(6, hidden, slots, 2)
        self.value = nn.Linear(d, slots * width)
        self.out = nn.Linear(slots * width, d)
        self.position = nn.Linear(d, d)
        for layer in (self.out, self.position):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: Tensor, boxes: Tensor, objectness: Tensor) -> Tensor:
        """hidden [B, Q, d], boxes [B, Q, 4] normalised cxcywh, objectness logits [B, Q]
        -> contextualised embeddings [B, Q, d]. Boxes and objectness only weigh: no gradient
        flows into them from here, so retrieval losses cannot bend localisation."""
        context, own_box = self.terms(hidden, boxes, objectness)
        return hidden + context + own_box

    def terms(self, hidden: Tensor, boxes: Tensor, objectness: Tensor) -> tuple[Tensor, Tensor]:
        """The two added terms, [B, Q, d] each: what lies around (the slots' sums, projected)
        and the instance's own box (`probes/context.py` weighs them against the decoder state)."""
        b, q, _ = hidden.shape
        boxes, objectness = boxes.detach(), objectness.detach()
        gates = torch.sigmoid(self.gate(pairwise_geometry(boxes * 4.0)))  # [B, Q(i), Q(j), S]
        others = 1.0 - torch.eye(q, dtype=gates.dtype, device=gates.device)
        weights = gates * (others[None, :, :, None] * torch.sigmoid(objectness)[:, None, :, None])
        values = self.value(hidden).view(b, q, self.slots, self.width)
        context = torch.einsum("bijs,bjsk->bisk", weights, values).reshape(b, q, -1)
        return self.out(context), self.position(box_sine(boxes, self.d))
