"""What the deployed graphs compute, as PyTorch modules: the exporter traces these, and
the PyTorch evaluation runs them eagerly, so the two cannot drift apart.

`Detector`: raw uint8 pixels in, per image the top-K instances after class-agnostic NMS
(IoU 0.7) out, padded to K, each kept box with its own embedding. NMS is ONNX
`NonMaxSuppression` in the graph (emitted by `BatchedNMS.symbolic`; no torchvision),
followed by scatters/gathers that pad each image's selection to K.

`TextQuery`: token ids + mask in, the query vector T out (pooling, L2 norm, MORE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .box_ops import cxcywh_to_xyxy, nms
from .model import CLARE


class BatchedNMS(torch.autograd.Function):
    """selected_indices [M, 3] = (batch, class 0, box), ONNX `NonMaxSuppression` semantics:
    per image, descending score, suppressed only when IoU > threshold."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_keep: int, iou: float) -> Tensor:
        rows = []
        for b in range(boxes.shape[0]):
            keep = nms(boxes[b], scores[b, 0], iou, max_keep)
            rows.append(torch.stack([torch.full_like(keep, b), torch.zeros_like(keep), keep], 1))
        return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, max_keep: int, iou: float):
        k = g.op("Constant", value_t=torch.tensor([max_keep], dtype=torch.long))
        t = g.op("Constant", value_t=torch.tensor([iou], dtype=torch.float))
        return g.op("NonMaxSuppression", boxes, scores, k, t, center_point_box_i=0)


def pad_selection(selected: Tensor, batch: int, k: int) -> tuple[Tensor, Tensor]:
    """[M, 3] selection -> per image [B, K] box indices (0 where padded) and a validity mask.

    Rows arrive grouped by image in score order, so a row's slot is its rank within its image.
    """
    image = selected[:, 0]
    onehot = (image[:, None] == torch.arange(batch, device=selected.device)[None, :]).long()  # [M, B]
    rank = (torch.cumsum(onehot, 0) - 1).gather(1, image[:, None]).squeeze(1)
    slot = image * k + rank
    index = torch.zeros(batch * k, dtype=torch.long, device=selected.device).scatter(0, slot, selected[:, 2])
    valid = torch.zeros(batch * k, dtype=torch.long, device=selected.device).scatter(0, slot, torch.ones_like(slot))
    return index.view(batch, k), valid.view(batch, k)


class Detector(nn.Module):
    """images uint8 [B, S, S, 3] (RGB, already resized to the model's input size S) ->
    boxes [B, K, 4] xyxy in input pixels, scores [B, K] (objectness), embeddings [B, K, D],
    num_detections [B] (int64). Slots past num_detections are zero."""

    def __init__(self, model: CLARE, topk: int = 30, nms_iou: float = 0.7):
        super().__init__()
        self.model, self.topk, self.nms_iou = model, topk, nms_iou

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h, w = images.shape[1], images.shape[2]
        x = images.permute(0, 3, 1, 2).float() / 255.0
        out = self.model.encode_image(x)
        scores = out["objectness"][-1].sigmoid()  # [B, Q]
        scale = torch.tensor([w, h, w, h], dtype=scores.dtype, device=scores.device)  # static H, W in the graph
        boxes = cxcywh_to_xyxy(out["boxes"][-1]) * scale
        emb = out["embeddings"][-1]
        batch = images.shape[0]
        selected = BatchedNMS.apply(boxes, scores.unsqueeze(1), self.topk, self.nms_iou)
        index, valid = pad_selection(selected, batch, self.topk)
        mask = valid.to(scores.dtype)
        kept_boxes = boxes.gather(1, index[..., None].expand(-1, -1, 4)) * mask[..., None]
        kept_scores = scores.gather(1, index) * mask
        kept_emb = emb.gather(1, index[..., None].expand(-1, -1, emb.shape[-1])) * mask[..., None]
        return kept_boxes, kept_scores, kept_emb, valid.sum(1)


class TextQuery(nn.Module):
    """input_ids, attention_mask (int64 [B, L]) -> query [B, D]."""

    def __init__(self, model: CLARE):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)
