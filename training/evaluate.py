"""Evaluation with the clean, text-free gallery protocol (clare.md §3).

Per gallery image, once, no text: last decoder layer -> objectness -> class-agnostic
NMS at 0.7 -> top 30 -> raw embeddings + boxes in original pixels. A query is one text
encoding and a dot product with every stored instance; the metrics come from
`reir.engine.metrics`. REC: per query, in its own image, sigmoid(<o, T>) over all
queries -> NMS -> the top box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from reir.engine.data import Dataset
from reir.engine.data.dataset import gallery_split
from reir.engine.metrics import GalleryArrays, Report, evaluate, rank_gallery

from .box_ops import cxcywh_to_xyxy, nms
from .config import EvalConfig
from .data import load_rgb
from .model import CLARE
from .text import tokenize


@dataclass
class ImageFeatures:
    """Everything the protocol needs from one image: all queries (REC) and the top-k (gallery)."""

    boxes: np.ndarray  # [Q, 4] xyxy, original pixels
    embeddings: np.ndarray  # [Q, D]
    keep: np.ndarray  # indices of the gallery candidates (NMS + top-k by objectness)


@torch.no_grad()
def encode_gallery(
    model: CLARE, ds: Dataset, image_ids: list[int], cfg: EvalConfig, batch: int = 32, progress: bool = True
) -> dict[int, ImageFeatures]:
    model.eval()
    size = model.cfg.image_size
    out: dict[int, ImageFeatures] = {}
    for start in tqdm(range(0, len(image_ids), batch), desc="gallery", disable=not progress, unit="batch"):
        ids = image_ids[start : start + batch]
        arrays = [(i, load_rgb(ds.image_path(i), size)) for i in ids]
        arrays = [(i, a) for i, a in arrays if a is not None]
        if not arrays:
            continue
        x = torch.from_numpy(np.stack([a for _, a in arrays])).permute(0, 3, 1, 2).float() / 255.0
        o = model.encode_image(x)
        scores = o["objectness"][-1].sigmoid()
        boxes = cxcywh_to_xyxy(o["boxes"][-1])
        for b, (image_id, _) in enumerate(arrays):
            meta = ds.images[image_id]
            scale = torch.tensor([meta.width, meta.height, meta.width, meta.height], dtype=boxes.dtype)
            px = boxes[b] * scale
            keep = nms(px, scores[b], cfg.nms_iou, cfg.topk)
            out[image_id] = ImageFeatures(px.numpy(), o["embeddings"][-1][b].float().numpy(), keep.numpy())
    return out


@torch.no_grad()
def encode_queries(model: CLARE, tokenizer, texts: list[str], batch: int = 128) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenize(tokenizer, texts[start : start + batch], model.cfg.text.max_length)
        out.append(model.encode_text(enc["input_ids"], enc["attention_mask"]).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


def gallery_arrays(feats: dict[int, ImageFeatures]) -> GalleryArrays:
    emb, ids, boxes = [], [], []
    for image_id, f in feats.items():
        emb.append(f.embeddings[f.keep])
        boxes.append(f.boxes[f.keep])
        ids.append(np.full(len(f.keep), image_id))
    dim = next(iter(feats.values())).embeddings.shape[1] if feats else 0
    return GalleryArrays(
        np.concatenate(emb) if emb else np.zeros((0, dim), np.float32),
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate(boxes) if boxes else np.zeros((0, 4)),
    )


def rec_box(f: ImageFeatures, query: np.ndarray, nms_iou: float) -> np.ndarray:
    s = torch.from_numpy(f.embeddings @ query).sigmoid()
    keep = nms(torch.from_numpy(f.boxes), s, nms_iou, 1)
    return f.boxes[int(keep[0])]


def evaluate_model(
    model: CLARE, tokenizer, ds: Dataset, split: str, cfg: EvalConfig, progress: bool = True, k: int = 100
) -> Report:
    image_ids = ds.gallery_image_ids(split)
    if cfg.gallery_images:
        image_ids = image_ids[: cfg.gallery_images]
    kept = set(image_ids)
    exprs = [
        e
        for e in sorted(ds.split_expressions(split), key=lambda e: e.id)
        if ds.instances[e.instance_id].image_id in kept
    ]
    feats = encode_gallery(model, ds, image_ids, cfg, progress=progress)
    queries = encode_queries(model, tokenizer, [e.text for e in exprs])
    hits = rank_gallery(queries, gallery_arrays(feats), k=k)
    rec = {}
    for e, q in zip(exprs, queries, strict=True):
        f = feats.get(ds.instances[e.instance_id].image_id)
        if f is not None:
            rec[e.id] = rec_box(f, q, cfg.nms_iou)
    sub = _restrict(ds, split, kept) if cfg.gallery_images else ds
    report = evaluate({e.id: h for e, h in zip(exprs, hits, strict=True)}, sub, split, rec_boxes=rec)
    report.meta.update({"protocol": f"text-free gallery, NMS {cfg.nms_iou:.2f}, top-{cfg.topk}"})
    return report


def _restrict(ds: Dataset, split: str, images: set[int]) -> Dataset:
    """The dataset seen through a gallery of the first N images: answers outside it dropped."""
    from dataclasses import replace

    exprs = {}
    for e in ds.expressions.values():
        if gallery_split(e.split) != gallery_split(split) or ds.instances[e.instance_id].image_id not in images:
            continue
        ans = tuple(a for a in e.answers if ds.instances[a].image_id in images) if e.answers is not None else None
        exprs[e.id] = replace(e, answers=ans)
    imgs = {i: im for i, im in ds.images.items() if i in images}
    return replace(ds, images=imgs, expressions=exprs)
