"""Hungarian matching of queries to ground-truth objects (scipy).

Cost = class * focal(objectness) + l1 * L1(cxcywh) + giou * (-GIoU), as the UNINEXT/DINO
criterion with the paper's weights (2, 5, 2). The objectness score is text-free, so
matching is class-agnostic; simOTA (the official code's choice) is not implemented
(see training/README.md).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .box_ops import cxcywh_to_xyxy, generalized_box_iou


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    targets: list[Tensor],
    w_class: float = 2.0,
    w_l1: float = 5.0,
    w_giou: float = 2.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """logits [B, Q], boxes [B, Q, 4] (cxcywh), targets: per image [n, 4] cxcywh.
    Returns per image (query indices, target indices), on the device of `boxes`."""
    out = []
    prob = logits.float().sigmoid()
    for b, tgt in enumerate(targets):
        if len(tgt) == 0:
            empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
            out.append((empty, empty))
            continue
        p = prob[b]
        neg = (1 - alpha) * p**gamma * (-(1 - p + 1e-8).log())
        pos = alpha * (1 - p) ** gamma * (-(p + 1e-8).log())
        c_class = (pos - neg)[:, None].expand(-1, len(tgt))
        c_l1 = torch.cdist(boxes[b].float(), tgt.float(), p=1)
        c_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes[b].float()), cxcywh_to_xyxy(tgt.float()))
        cost = (w_class * c_class + w_l1 * c_l1 + w_giou * c_giou).cpu().numpy()
        qi, ti = linear_sum_assignment(np.nan_to_num(cost, nan=1e6, posinf=1e6))
        out.append(
            (
                torch.as_tensor(qi, dtype=torch.long, device=boxes.device),
                torch.as_tensor(ti, dtype=torch.long, device=boxes.device),
            )
        )
    return out
