"""CLARE: a dual-stream model. Visual branch (text-free) and text branch meet only in
the final dot product, so gallery images are encoded once, offline.

visual: backbone -> neck -> encoder -> text-free proposal selection -> decoder with
        iterative refinement -> per query: box, objectness, instance embedding
        (+ optional neighbour context, context.py)
text:   encoder -> mean pool -> L2 norm -> MORE (one per decoder layer) -> query T
score:  <T, o> (raw dot product, as the paper)
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .backbone import build_backbone
from .config import ModelConfig
from .context import InstanceContext
from .more import text_projection
from .neck import Neck
from .proposals import PRIOR, ProposalSelector
from .text import TextEncoder
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
        self.text = TextEncoder(cfg.text)
        m = cfg.text.more
        self.text_proj = nn.ModuleList(
            text_projection(self.text.dim, d, m.enabled, m.experts, m.top_k, m.weight) for _ in range(cfg.dec_layers)
        )

    @property
    def embed_dim(self) -> int:
        return self.cfg.d_model

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
        return {
            "embeddings": embeddings,  # per layer [B, Q, d]
            **extra,
            "boxes": boxes,
            "objectness": objectness,
            "enc_boxes": prop["enc_boxes"],
            "enc_logits": prop["enc_logits"],
        }

    def encode_sentence(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text(input_ids, attention_mask)

    def queries(self, sentence: Tensor) -> list[Tensor]:
        """Per decoder layer, the query vector T = MORE(normalised sentence embedding)."""
        return [proj(sentence) for proj in self.text_proj]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The inference query vector (last layer's MORE)."""
        return self.text_proj[-1](self.encode_sentence(input_ids, attention_mask))


def build_model(cfg: ModelConfig) -> CLARE:
    return CLARE(cfg)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
