"""CLARE: a dual-stream model. Visual branch (text-free) and text branch meet only in
the final dot product, so gallery images are encoded once, offline.

visual: backbone -> neck -> encoder -> text-free proposal selection -> decoder with
        iterative refinement -> per query: box, objectness, instance embedding
        (+ optional neighbour context, context.py)
text:   encoder -> mean pool -> L2 norm -> MORE (one per decoder layer) -> query T
score:  <T, o> (raw dot product, as the paper)

With `anchor_dim` > 0 both vectors are extended by one slot per spatial relation
(relations.py): the instance's with the anchors around it, the query's with the anchor it
asks for on the side it asks. Still one vector each and one dot product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .backbone import build_backbone
from .config import ModelConfig
from .context import InstanceContext
from .more import text_projection
from .neck import Neck
from .proposals import PRIOR, ProposalSelector
from .relations import RELATIONS, RelationQuery, RelationSlots, TokenPool
from .text_branch import TextBranch
from .transformer import Decoder, DecoderLayer, Encoder, EncoderLayer

NUM_LEVELS = 3  # strides 8, 16, 32: enough for 128-px scenes; the paper adds stride 64 at 800 px


class CLARE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        levels = NUM_LEVELS if cfg.image_size <= 512 else NUM_LEVELS + 1
        self.neck = Neck(tuple(self.backbone.out_channels), d, levels)
        self.encoder = Encoder(EncoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout), cfg.enc_layers)
        self.proposals = ProposalSelector(d, cfg.num_queries)
        layer = DecoderLayer(d, cfg.heads, cfg.ffn, cfg.dropout, cfg.relation_context)
        self.decoder = Decoder(layer, cfg.dec_layers, d, cfg.box_features)
        self.objectness = nn.ModuleList(nn.Linear(d, 1) for _ in range(cfg.dec_layers))
        for head in self.objectness:
            nn.init.constant_(head.bias, -math.log((1 - PRIOR) / PRIOR))
        slots, width = cfg.context_slots, cfg.context_width
        self.context = nn.ModuleList(InstanceContext(d, slots, width) for _ in range(cfg.dec_layers)) if slots else None
        self.text = TextBranch(cfg.text)
        m = cfg.text.more
        self.text_proj = nn.ModuleList(
            text_projection(self.text.dim, d, m.enabled, m.experts, m.top_k, m.weight) for _ in range(cfg.dec_layers)
        )
        self.relation_slots = self.text_pools = self.relation_query = None
        if cfg.anchor_dim:
            self.relation_slots = nn.ModuleList(RelationSlots(d, cfg.anchor_dim) for _ in range(cfg.dec_layers))
            self.text_pools = nn.ModuleList(TokenPool(self.text.hidden_dim) for _ in ("anchor", "relation"))
            self.relation_query = RelationQuery(self.text.hidden_dim)
        self.use_relations = cfg.anchor_dim > 0  # train_relations

    @property
    def embed_dim(self) -> int:
        return self.cfg.d_model + len(RELATIONS) * self.cfg.anchor_dim

    def train_relations(self, train: bool, supervised: bool) -> None:
        """Per stage (the trainer): do the relation slots train and score (`stage.relations`), and
        do exact labels teach them (RelationSlots.supervised)? A stage that leaves them out
        trains the model as if it had none: both vectors stop at d_model and the slots are
        frozen (stage 1 of the CPU recipe then costs what it cost without them)."""
        if self.relation_slots is None:
            return
        for module in (self.relation_slots, self.text_pools, self.relation_query):
            module.requires_grad_(train)
        for module in (*self.relation_slots, self.relation_query):
            module.supervised = supervised
        self.use_relations = train

    def encode_image(self, images: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """images: RGB in [0, 1], [B, 3, H, W]. Boxes are normalised cxcywh."""
        tokens, pos, shapes, fine = self.neck(self.backbone(images))
        pos = pos.unsqueeze(0)
        memory = self.encoder(tokens, pos)
        prop = self.proposals(memory, shapes)
        # The encoder's refined finest level: its tokens come first in `memory`.
        h, w = shapes[0]
        fine = memory[:, : h * w].transpose(1, 2).reshape(fine.shape)
        hidden, boxes = self.decoder(prop["tgt"], prop["ref"], memory, pos, fine)
        objectness = [head(h).squeeze(-1) for head, h in zip(self.objectness, hidden, strict=True)]
        embeddings = hidden  # the paper's instance embedding is the raw decoder state
        extra = {}
        if self.context is not None:  # ... ours adds what lies around it (training/context.py)
            layers = zip(self.context, hidden, boxes, objectness, strict=True)
            terms = [context.terms(h, b, o) for context, h, b, o in layers]
            embeddings = [h + near + own for h, (near, own) in zip(hidden, terms, strict=True)]
            extra["neighbours"] = [near for near, _ in terms]  # for the neighbour-naming loss
        if self.use_relations:  # ... and the anchors around it, by relation (relations.py)
            layers = zip(self.relation_slots, embeddings, boxes, objectness, strict=True)
            slots = [rel(e, b, o) for rel, e, b, o in layers]
            embeddings = [torch.cat([e, s], -1) for e, (s, _) in zip(embeddings, slots, strict=True)]
            extra["anchor_codes"] = [codes for _, codes in slots]  # for the anchor loss
        return {
            "embeddings": embeddings,  # per layer [B, Q, d]
            **extra,
            "boxes": boxes,
            "objectness": objectness,
            "enc_boxes": prop["enc_boxes"],
            "enc_logits": prop["enc_logits"],
        }

    def encode_sentence(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Sentence features: the normalised sentence embedding [B, D], and with relation slots
        the anchor and relation pools after it ([B, D + 2 hidden])."""
        if self.text_pools is None:
            return self.text(input_ids, attention_mask)
        sentence, hidden = self.text.features(input_ids, attention_mask)
        return torch.cat([sentence, *(pool(hidden, attention_mask) for pool in self.text_pools)], -1)

    def queries(self, sentence: Tensor) -> list[Tensor]:
        """Per decoder layer, the query vector T = MORE(normalised sentence embedding), and with
        relation slots the layer's slot vector after it."""
        return self._with_slots(range(len(self.text_proj)), sentence)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The inference query vector (last layer's)."""
        return self._with_slots([len(self.text_proj) - 1], self.encode_sentence(input_ids, attention_mask))[0]

    def relation_parts(self, sentence: Tensor, layers=None) -> tuple[Tensor, list[Tensor]]:
        """(relation logits [B, R + 1], per decoder layer the anchor's code [B, anchor_dim])."""
        anchor, relation = sentence[:, self.text.dim :].chunk(2, -1)
        layers = range(len(self.text_proj)) if layers is None else layers
        codes = [self.relation_slots[n].code(self.text_proj[n](anchor)) for n in layers]
        return self.relation_query.relation(relation), codes

    def _with_slots(self, layers, sentence: Tensor) -> list[Tensor]:
        own = [self.text_proj[n](sentence[:, : self.text.dim]) for n in layers]
        if not self.use_relations:
            return own
        logits, codes = self.relation_parts(sentence, layers)
        slots = [self.relation_query.slots(logits, code) for code in codes]
        return [torch.cat([q, x], -1) for q, x in zip(own, slots, strict=True)]


def build_model(cfg: ModelConfig) -> CLARE:
    return CLARE(cfg)
