"""Multi-scale neck: per-level input projections to d_model, position encodings, flattening."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _groups(c: int) -> int:
    return 32 if c % 32 == 0 else 8 if c % 8 == 0 else 1


def sine_position(h: int, w: int, d: int, device: torch.device) -> Tensor:
    """Normalised 2-D sine encoding (d/2 per axis), [h*w, d]."""
    half = d // 2
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(half // 2, device=device, dtype=torch.float32)) / half)
    py = ys[:, None] / dim_t  # [h, half/2]
    px = xs[:, None] / dim_t
    py = torch.cat([py.sin(), py.cos()], -1)[:, None, :].expand(h, w, half)
    px = torch.cat([px.sin(), px.cos()], -1)[None, :, :].expand(h, w, half)
    return torch.cat([py, px], -1).reshape(h * w, d)


class Neck(nn.Module):
    """1x1 conv + GroupNorm per backbone level to d_model, plus one 3x3 stride-2 level per
    extra level requested (the paper's stride-64 level)."""

    def __init__(self, in_channels: tuple[int, ...], d: int, num_levels: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, 1), nn.GroupNorm(_groups(d), d)) for c in in_channels)
        extra = max(0, num_levels - len(in_channels))
        cin = in_channels[-1]
        self.extra = nn.ModuleList()
        for _ in range(extra):
            self.extra.append(nn.Sequential(nn.Conv2d(cin, d, 3, 2, 1), nn.GroupNorm(_groups(d), d)))
            cin = d
        self.num_levels = len(in_channels) + extra
        self.level_embed = nn.Parameter(torch.zeros(self.num_levels, d))
        nn.init.normal_(self.level_embed, std=0.02)
        self.d = d

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor, list[tuple[int, int]], Tensor]:
        """-> tokens [B, N, d], positions [N, d] (shared across the batch), level shapes,
        and the finest projected map [B, d, H, W] (for box-pooled features)."""
        maps = [p(f) for p, f in zip(self.proj, feats, strict=True)]
        last = feats[-1]
        for e in self.extra:
            last = e(last)
            maps.append(last)
        tokens, pos, shapes = [], [], []
        for lvl, m in enumerate(maps):
            _, d, h, w = m.shape
            tokens.append(m.flatten(2).transpose(1, 2))
            pos.append(sine_position(h, w, d, m.device) + self.level_embed[lvl])
            shapes.append((h, w))
        return torch.cat(tokens, 1), torch.cat(pos, 0), shapes, maps[0]
