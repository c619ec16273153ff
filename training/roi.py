"""Box-pooled appearance: bilinear samples of a feature map on a k x k grid inside each box.

Fed into every decoder layer's queries (as Sparse R-CNN does), so an instance embedding
holds its own colour/shape directly and, through the relation-biased self-attention,
its neighbours'. Exports as ONNX GridSample (opset 16), which ORT and TensorRT run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def roi_pool(features: Tensor, boxes: Tensor, grid: int = 4) -> Tensor:
    """features [B, C, H, W], boxes [B, Q, 4] normalised cxcywh -> [B, Q, C] (mean over the grid)."""
    b, q, _ = boxes.shape
    steps = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid - 0.5  # [-0.5, 0.5)
    cx, cy, w, h = boxes.unbind(-1)
    xs = cx[..., None] + w[..., None] * steps  # [B, Q, g]
    ys = cy[..., None] + h[..., None] * steps
    gx = xs[:, :, None, :].expand(b, q, grid, grid)
    gy = ys[:, :, :, None].expand(b, q, grid, grid)
    coords = torch.stack([gx, gy], -1).reshape(b, q * grid, grid, 2) * 2 - 1  # grid_sample wants [-1, 1]
    sampled = F.grid_sample(features, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.reshape(b, features.shape[1], q, grid * grid).mean(-1).transpose(1, 2)
