"""Encoder and decoder layers (plain multi-head attention, so the graph exports cleanly).

The decoder does iterative box refinement (each layer predicts a delta on the
inverse-sigmoid of the previous box) with look-forward-twice gradients, and its
self-attention among queries carries an optional **relation context**: a learned
per-head bias from the pairwise geometry of the queries' current boxes. Across
images an instance embedding must itself say "I am left of a red circle"; the bias
lets heads specialise to left/right/above/below/near neighbours and pool what those
neighbours are (see training/README.md).
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
from torch import Tensor, nn

from .roi import roi_pool


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class MLP(nn.Module):
    def __init__(self, din: int, hidden: int, dout: int, layers: int):
        super().__init__()
        dims = [din] + [hidden] * (layers - 1) + [dout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        q = x + pos
        x = self.norm1(x + self.drop(self.attn(q, q, x, need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ffn(x)))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, n: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n))

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


def box_sine(boxes: Tensor, d: int) -> Tensor:
    """Sine embedding of normalised cxcywh boxes -> [..., d] (d/4 per coordinate)."""
    quarter = d // 4
    dim_t = 10000 ** (2 * (torch.arange(quarter // 2, device=boxes.device, dtype=torch.float32)) / quarter)
    x = boxes[..., None] * (2 * math.pi) / dim_t  # [..., 4, quarter/2]
    return torch.cat([x.sin(), x.cos()], -1).flatten(-2)


def pairwise_geometry(boxes: Tensor) -> Tensor:
    """[B, Q, 4] cxcywh -> [B, Q, Q, 6]: where j is relative to i, in image units and log sizes."""
    cx, cy, w, h = boxes.unbind(-1)
    dx = cx[:, None, :] - cx[:, :, None]
    dy = cy[:, None, :] - cy[:, :, None]
    w, h = w.clamp(min=1e-3), h.clamp(min=1e-3)
    lw = torch.log(w[:, None, :] / w[:, :, None])
    lh = torch.log(h[:, None, :] / h[:, :, None])
    gx = dx.abs() - (w[:, None, :] + w[:, :, None]) / 2  # gap between boxes (negative: overlap)
    gy = dy.abs() - (h[:, None, :] + h[:, :, None]) / 2
    return torch.stack([dx, dy, lw, lh, gx, gy], -1)


class RelationBias(nn.Module):
    """Pairwise geometry -> an additive attention bias per head."""

    def __init__(self, heads: int, hidden: int = 64):
        super().__init__()
        self.mlp = MLP(6, hidden, heads, 2)
        self.heads = heads

    def forward(self, boxes: Tensor) -> Tensor:
        b, q, _ = boxes.shape
        bias = self.mlp(pairwise_geometry(boxes * 4.0))  # scale: geometry in quarter-images
        return bias.permute(0, 3, 1, 2).reshape(b * self.heads, q, q)


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, ffn: int, dropout: float, relation_context: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d))
        self.drop = nn.Dropout(dropout)
        self.relation = RelationBias(heads) if relation_context else None

    def forward(self, tgt: Tensor, qpos: Tensor, memory: Tensor, mpos: Tensor, ref: Tensor) -> Tensor:
        q = tgt + qpos
        bias = self.relation(ref) if self.relation is not None else None
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, q, tgt, attn_mask=bias, need_weights=False)[0]))
        attn = self.cross_attn(tgt + qpos, memory + mpos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop(attn))
        return self.norm3(tgt + self.drop(self.ffn(tgt)))


class Decoder(nn.Module):
    """Returns per layer: hidden states [B, Q, d] and boxes [B, Q, 4] (normalised cxcywh)."""

    def __init__(self, layer: DecoderLayer, n: int, d: int, box_features: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(n))
        # Box-pooled appearance added to the queries before every layer (training/roi.py).
        self.roi_proj = nn.ModuleList(nn.Linear(d, d) for _ in range(n)) if box_features else None
        self.box_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(n))
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        self.query_pos = MLP(d, d, d, 2)
        self.d = d

    def forward(
        self, tgt: Tensor, ref: Tensor, memory: Tensor, mpos: Tensor, feature_map: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        hidden, boxes = [], []
        ref_in = ref.detach()
        prev_undetached = ref
        for i, (layer, head) in enumerate(zip(self.layers, self.box_heads, strict=True)):
            qpos = self.query_pos(box_sine(ref_in, self.d))
            if self.roi_proj is not None and feature_map is not None:
                tgt = tgt + self.roi_proj[i](roi_pool(feature_map, ref_in))
            tgt = layer(tgt, qpos, memory, mpos, ref_in)
            delta = head(tgt)
            # Look forward twice: the loss sees the box refined from the previous layer's
            # undetached output; the next layer starts from a detached copy.
            out = torch.sigmoid(delta + inverse_sigmoid(prev_undetached))
            hidden.append(tgt)
            boxes.append(out)
            prev_undetached = torch.sigmoid(delta + inverse_sigmoid(ref_in))
            ref_in = prev_undetached.detach()
        return hidden, boxes
