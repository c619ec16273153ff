"""SetCriterion: every loss term of both stages, on every decoder layer and the encoder
proposals (deep supervision). Weights as in docs/model.md (LossConfig).

| term | what | stage |
|---|---|---|
| objectness | sigmoid focal on the text-free score, matched queries = 1 | both |
| l1 / giou | matched boxes | both |
| class | focal on <o, T(category name)> (detection with names from the text branch) | detection |
| select | per-image focal instance selection on <o, T(expression)> (REC) | rec |
| clia | sigmoid pairwise loss against the global batch of texts | clia |
| neighbours | neighbour naming of the context term and of relation texts (neighbours.py) | both, if weighted |
| anchor / relation_type | what the relation slots hold, which one a text asks (relation_loss.py) | if weighted |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .box_ops import box_iou, cxcywh_to_xyxy, generalized_box_iou
from .clia import CLIALoss, clia_labels, comm_device, gather_with_grad, positive_matrix
from .config import LossConfig, StageConfig
from .matcher import hungarian_match
from .neighbours import NeighbourReadout
from .relation_loss import anchor_loss, relation_type_loss


def sigmoid_focal(logits: Tensor, targets: Tensor, alpha: float, gamma: float) -> Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


@dataclass
class Targets:
    """One training batch's ground truth (local rank)."""

    boxes: list[Tensor]  # per image [n, 4] normalised cxcywh
    labels: list[Tensor]  # per image [n] category index
    text_image: list[int]  # per local text: its image
    text_target: list[int]  # per local text: the object it refers to
    positives: list[list[list[int]]]  # [image][global text] -> objects that text is true of
    facts: list[Tensor] | None = None  # per image [n, F]: neighbour facts of each object (neighbours.py)
    text_facts: tuple[Tensor, Tensor] | None = None  # (local relation texts, the facts they ask [T, F])
    text_anchors: list[list[int]] | None = None  # per local text: the objects of its image that fit its anchor
    text_relations: list[int] | None = None  # per local text: its relation's slot (relation_loss.py)


class SetCriterion(nn.Module):
    def __init__(self, cfg: LossConfig, num_layers: int, d_model: int):
        super().__init__()
        self.cfg = cfg
        self.clia = nn.ModuleList(CLIALoss(cfg.clia_init_scale, cfg.clia_init_bias) for _ in range(num_layers))
        if cfg.neighbour_weight > 0:  # only then: older checkpoints hold no readout
            self.neighbours = nn.ModuleList(NeighbourReadout(d_model) for _ in range(num_layers))

    def _match(self, logits: Tensor, boxes: Tensor, t: Targets) -> list[tuple[Tensor, Tensor]]:
        c = self.cfg
        return hungarian_match(
            logits, boxes, t.boxes, c.match_class, c.match_l1, c.match_giou, c.focal_alpha, c.focal_gamma
        )

    def _box_terms(self, logits: Tensor, boxes: Tensor, t: Targets, match, num_boxes: float) -> dict[str, Tensor]:
        c = self.cfg
        obj_t = torch.zeros_like(logits)
        src, tgt = [], []
        for b, (qi, ti) in enumerate(match):
            obj_t[b, qi] = 1.0
            src.append(boxes[b, qi])
            tgt.append(t.boxes[b][ti])
        src_b, tgt_b = torch.cat(src), torch.cat(tgt).to(boxes.dtype)
        out = {"objectness": sigmoid_focal(logits, obj_t, c.focal_alpha, c.focal_gamma) / num_boxes}
        out["l1"] = F.l1_loss(src_b, tgt_b, reduction="sum") / num_boxes
        giou = generalized_box_iou(cxcywh_to_xyxy(src_b), cxcywh_to_xyxy(tgt_b))
        out["giou"] = (1 - torch.diag(giou)).sum() / num_boxes
        return out

    @torch.no_grad()
    def _owners(self, boxes: Tensor, t: Targets, match, num_objects: int) -> Tensor:
        """[B, Q, N] in {0, 1}: which queries stand for which object (padded to N) in the
        selection and CLIA losses: the Hungarian match, plus every query whose box overlaps the
        object with IoU >= `select_iou`. Duplicates are then not negatives; the gallery's NMS
        removes them."""
        own = torch.zeros(boxes.shape[0], boxes.shape[1], num_objects, device=boxes.device)
        for b, (qi, ti) in enumerate(match):
            n = len(t.boxes[b])
            if self.cfg.select_iou <= 1.0 and n:
                iou = box_iou(cxcywh_to_xyxy(boxes[b].float()), cxcywh_to_xyxy(t.boxes[b].float()))[0]
                own[b, :, :n] = (iou >= self.cfg.select_iou).float()
            own[b, qi, ti] = 1.0
        return own

    def forward(
        self,
        outputs: dict,
        queries: list[Tensor],
        targets: Targets,
        stage: StageConfig,
        category_queries: list[Tensor] | None = None,
        relation_parts: tuple[Tensor, list[Tensor]] | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """outputs: CLARE.encode_image; queries: per layer [T, d] (local texts, several per image;
        the ones with a target first, then counterfactuals without one); relation_parts: the
        relation logits and per-layer anchor codes of the texts with a target (CLARE.relation_parts)."""
        c = self.cfg
        num_boxes = _global_count(sum(len(b) for b in targets.boxes))
        weights = {"objectness": c.objectness_weight, "l1": c.l1_weight, "giou": c.giou_weight}
        total = torch.zeros((), device=outputs["boxes"][-1].device)
        logs: dict[str, float] = {}

        def add(name: str, value: Tensor, weight: float) -> None:
            nonlocal total
            total = total + weight * value
            logs[name] = logs.get(name, 0.0) + float(value.detach())

        # Encoder proposals: own matching, objectness + boxes.
        enc_match = self._match(outputs["enc_logits"], outputs["enc_boxes"], targets)
        for k, v in self._box_terms(outputs["enc_logits"], outputs["enc_boxes"], targets, enc_match, num_boxes).items():
            add(f"enc_{k}", v, weights[k])

        n_layers = len(outputs["boxes"])
        device = outputs["boxes"][-1].device
        num_objects = max([len(b) for b in targets.boxes] + [1])
        img = torch.as_tensor(targets.text_image, dtype=torch.long, device=device)
        obj = torch.as_tensor(targets.text_target, dtype=torch.long, device=device)
        pos = None
        relational = relation_parts is not None and targets.text_anchors is not None and "anchor_codes" in outputs
        if relational:
            rel_logits, rel_anchors = relation_parts
            add("relation_type", relation_type_loss(rel_logits, targets.text_relations), c.relation_weight)
            asking = [k for k, objs in enumerate(targets.text_anchors) if objs]  # the relation texts
            asking_t = torch.as_tensor(asking, dtype=torch.long, device=device)
        for layer in range(n_layers):
            last = layer == n_layers - 1
            logits, boxes, emb = outputs["objectness"][layer], outputs["boxes"][layer], outputs["embeddings"][layer]
            match = self._match(logits, boxes, targets)
            for k, v in self._box_terms(logits, boxes, targets, match, num_boxes).items():
                add(k, v, weights[k])
            if stage.detection and category_queries is not None:
                cls_logits = torch.einsum("bqd,cd->bqc", emb, category_queries[layer])
                cls_t = torch.zeros_like(cls_logits)
                for b, (qi, ti) in enumerate(match):
                    cls_t[b, qi, targets.labels[b][ti]] = 1.0
                add("class", sigmoid_focal(cls_logits, cls_t, c.focal_alpha, c.focal_gamma) / num_boxes, c.class_weight)
            owner = self._owners(boxes, targets, match, num_objects)
            if stage.rec:
                own = queries[layer][: len(targets.text_target)]  # counterfactuals follow: CLIA only
                sel = torch.einsum("td,tqd->tq", own, emb[img])
                sel_t = owner[img, :, obj].to(sel.dtype)  # [T, Q]: the queries standing for each text's target
                npos = _global_count(float(sel_t.sum()))
                add("select", sigmoid_focal(sel, sel_t, c.focal_alpha, c.focal_gamma) / npos, c.select_weight)
            if stage.clia:
                texts, _ = gather_with_grad(queries[layer])
                if pos is None:  # the same for every layer
                    pos = positive_matrix(targets.positives, num_objects, texts.shape[0], device)
                labels = clia_labels(owner, pos)
                clia = self.clia[layer](emb, texts, labels, c.clia_listwise)
                add("clia", clia, c.clia_weight if last else c.clia_aux_weight)
            if relational and asking:
                at = img[asking_t]
                objs = [targets.text_anchors[k] for k in asking]
                term = anchor_loss(rel_anchors[layer][asking_t], outputs["anchor_codes"][layer][at], owner[at], objs)
                add("anchor", term, c.relation_weight)
            if c.neighbour_weight > 0 and targets.facts is not None and "neighbours" in outputs:
                near = torch.cat([outputs["neighbours"][layer][b, qi] for b, (qi, _) in enumerate(match)])
                facts = torch.cat([targets.facts[b][ti] for b, (_, ti) in enumerate(match)]).to(near.dtype)
                index, asked = targets.text_facts
                texts = queries[layer][index]
                add("neighbours", self.neighbours[layer](near, facts, texts, asked.to(texts.dtype)), c.neighbour_weight)
        logs["total"] = float(total.detach())
        return total, logs


def _global_count(n: float) -> float:
    """A normaliser shared by all ranks (DETR: average number of boxes per rank), at least 1."""
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([float(n)], device=comm_device())
        dist.all_reduce(t)
        n = float(t.cpu()) / dist.get_world_size()
    return max(float(n), 1.0)
