"""Two-stage, text-free proposal selection (DINO's mixed query selection).

Every encoder token proposes a box (a delta on an anchor at its cell) and a binary
objectness score from the `Still_Classifier`; the top-Q tokens by objectness give the
decoder's reference boxes. Content queries are learned embeddings. No text is
involved, so gallery images are encoded once, offline.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from .overrides import overriding
from .transformer import MLP, inverse_sigmoid

PRIOR = 0.01  # initial objectness probability: bias -log(99)


def anchors(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """One anchor per token: its cell centre, size 0.1 * 2^level (image-normalised cxcywh)."""
    out = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
            (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
            indexing="ij",
        )
        wh = torch.full_like(xs, min(0.1 * 2**lvl, 0.8))
        out.append(torch.stack([xs, ys, wh, wh], -1).reshape(-1, 4))
    return torch.cat(out, 0)


class ProposalSelector(nn.Module):
    def __init__(self, d: int, num_queries: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.objectness = nn.Linear(d, 1)  # the "Still_Classifier"
        nn.init.constant_(self.objectness.bias, -math.log((1 - PRIOR) / PRIOR))
        self.box = MLP(d, d, 4, 3)
        nn.init.zeros_(self.box.layers[-1].weight)
        nn.init.zeros_(self.box.layers[-1].bias)
        self.content = nn.Embedding(num_queries, d)
        self.num_queries = num_queries
        self.swap_override: tuple[int, float] | None = None  # set by `swapped` only

    def forward(self, memory: Tensor, shapes: list[tuple[int, int]]) -> dict[str, Tensor]:
        feats = self.proj(memory)
        logits = self.objectness(feats).squeeze(-1)  # [B, N]
        boxes = torch.sigmoid(self.box(feats) + inverse_sigmoid(anchors(shapes, memory.device)))
        k = min(self.num_queries, logits.shape[1])
        if self.swap_override is None:
            idx = torch.topk(logits, k, dim=1).indices  # [B, Q]
        else:
            idx = _swap_at_tie(logits, k, *self.swap_override)
        sel_boxes = torch.gather(boxes, 1, idx[..., None].expand(-1, -1, 4))
        sel_logits = torch.gather(logits, 1, idx)
        tgt = self.content.weight[:k][None].expand(memory.shape[0], -1, -1)
        return {"ref": sel_boxes.detach(), "tgt": tgt, "enc_boxes": sel_boxes, "enc_logits": sel_logits}


def _swap_at_tie(logits: Tensor, k: int, rank: int, tie: float) -> Tensor:
    """The top-k token indices with ranks `rank` and `rank + 1` exchanged in every image where
    their objectness logits are within `tie` (rank k - 1 then trades places with the first token
    left out)."""
    top = torch.topk(logits, min(k + 1, logits.shape[1]), dim=1)
    if rank + 1 >= top.indices.shape[1]:
        return top.indices[:, :k]
    swapped = top.indices.clone()
    swapped[:, [rank, rank + 1]] = top.indices[:, [rank + 1, rank]]
    tied = (top.values[:, rank] - top.values[:, rank + 1] <= tie)[:, None]
    return torch.where(tied, swapped, top.indices)[:, :k]


def tied_ranks(logits: Tensor, k: int, tie: float) -> list[int]:
    """The ranks r < k whose proposal ties (within `tie`) with the one at r + 1 in some image:
    where reduced precision may exchange them. Content queries are per rank, so an exchange
    gives both boxes the other's content query: same boxes, other embeddings."""
    values = torch.topk(logits, min(k + 1, logits.shape[1]), dim=1).values
    return sorted({int(r) for r in torch.nonzero(values[:, :-1] - values[:, 1:] <= tie)[:, 1]})


def swapped(model: nn.Module, rank: int, tie: float) -> AbstractContextManager[None]:
    """Within the block, every ProposalSelector of `model` exchanges ranks `rank` and `rank + 1`
    where they tie within `tie`, and selects as usual elsewhere."""
    return overriding(model, ProposalSelector, "swap_override", (rank, tie))
