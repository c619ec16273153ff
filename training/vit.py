"""A plain ViT backbone with the simple feature pyramid (docs/model.md), for GPU recipes.

Parameter names follow timm's VisionTransformer (`patch_embed.proj`, `pos_embed`,
`blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so a SigLIP
ViT-B/16 state_dict saved from timm or open_clip loads from a local file. Position
embeddings are interpolated to the input size (timm's dynamic_img_size). No download.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ViTPyramid(nn.Module):
    """ViT (stride 16) -> strides 8 (ConvTranspose), 16 (identity), 32 (max-pool)."""

    def __init__(self, width: int = 768, depth: int = 12, heads: int = 12, patch: int = 16, pretrain_size: int = 384):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, width)
        grid = pretrain_size // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, width))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(width, heads, 4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.up = nn.ConvTranspose2d(width, width // 2, 2, 2)
        self.out_channels = (width // 2, width, width)
        self.grid = grid
        self.register_buffer("mean", torch.tensor(SIGLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SIGLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _pos(self, h: int, w: int) -> Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(self, x01: Tensor) -> list[Tensor]:
        x = self.patch_embed((x01 - self.mean) / self.std)
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self._pos(h, w)
        for blk in self.blocks:
            x = blk(x)
        f16 = self.norm(x).transpose(1, 2).reshape(b, c, h, w)
        return [self.up(f16), f16, F.max_pool2d(f16, 2, ceil_mode=True)]


def load_vit_weights(model: ViTPyramid, path: str) -> list[str]:
    """Load a timm-named state_dict from a local file; returns the keys left missing."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("trunk.").removeprefix("visual."): v for k, v in state.items()}
    missing, _ = model.load_state_dict(state, strict=False)
    return [k for k in missing if not k.startswith("up.")]
