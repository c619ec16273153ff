"""The evaluation protocol (docs/task-and-metrics.md), written once against two callables so that the
PyTorch model, the ONNX graphs and a Triton server are scored by the same code.

`detect(uint8 [B, H, W, 3]) -> (boxes [B, K, 4] in input pixels, scores [B, K],
embeddings [B, K, D], num_detections [B])`, i.e. the visual graph's outputs, with NMS and
top-K already applied; `encode_text(list[str]) -> [N, D]` query vectors.

A query is one text encoding and a dot product with every stored instance. REC: in the
query's own image, the kept candidate with the highest score.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from reir.datasets import Dataset
from reir.datasets.dataset import gallery_split
from reir.engine.runtime.detections import Detections, unpad
from reir.engine.runtime.image import ImageError, read_rgb, resize_rgb

from .probe import attribute_probe
from .ranking import GalleryArrays, rank_gallery
from .report import Report, evaluate

DetectFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
EncodeTextFn = Callable[[list[str]], np.ndarray]
# queries [Q, D], the gallery's detections by image id, k -> ranked instances per query
RankFn = Callable[[np.ndarray, dict, int], list]


def encode_gallery(
    detect: DetectFn,
    paths: list,
    input_hw: tuple[int, int],
    batch: int = 32,
    progress: bool = True,
) -> tuple[list[Detections | None], list[str]]:
    """Detections per path (None where the image is unusable) and the problems found."""
    out: list[Detections | None] = []
    problems: list[str] = []
    h, w = input_hw
    for start in tqdm(range(0, len(paths), batch), desc="gallery", disable=not progress, unit="batch"):
        arrays, sizes, slots = [], [], []
        for path in paths[start : start + batch]:
            try:
                img = read_rgb(path)
            except ImageError as e:
                problems.append(str(e))
                slots.append(None)
                continue
            slots.append(len(arrays))
            sizes.append(img.size)
            arrays.append(resize_rgb(img, h, w))
        dets = unpad(detect(np.stack(arrays)), sizes, input_hw) if arrays else []
        out.extend(dets[s] if s is not None else None for s in slots)
    return out, problems


def gallery_arrays(dets: dict[int, Detections], dim: int) -> GalleryArrays:
    ids = [np.full(len(d.scores), i) for i, d in dets.items()]
    return GalleryArrays(
        np.concatenate([d.embeddings for d in dets.values()]) if dets else np.zeros((0, dim), np.float32),
        np.concatenate(ids) if ids else np.zeros(0, np.int64),
        np.concatenate([d.boxes for d in dets.values()]) if dets else np.zeros((0, 4)),
    )


def evaluate_retrieval(
    detect: DetectFn,
    encode_text: EncodeTextFn,
    ds: Dataset,
    split: str,
    input_hw: tuple[int, int],
    gallery_images: int = 0,
    batch: int = 32,
    progress: bool = True,
    k: int = 100,
    rank: RankFn | None = None,
) -> Report:
    """The full report on `split`, with the gallery cut to its first `gallery_images` images.
    `rank`: how queries are ranked against the gallery (default: exactly, over arrays in
    memory; `reir eval --bundle` passes the product's gallery search, and the exact ranking
    goes into `meta["exact_protocol"]` beside it)."""
    image_ids = ds.gallery_image_ids(split)
    if gallery_images:
        image_ids = image_ids[:gallery_images]
    found, _ = encode_gallery(detect, [ds.image_path(i) for i in image_ids], input_hw, batch, progress)
    dets = {i: d for i, d in zip(image_ids, found, strict=True) if d is not None}
    kept = set(image_ids)
    exprs = [
        e
        for e in sorted(ds.split_expressions(split), key=lambda e: e.id)
        if ds.instances[e.instance_id].image_id in kept
    ]
    queries = encode_text([e.text for e in exprs])
    exact = rank_gallery(queries, gallery_arrays(dets, queries.shape[1]), k=k)
    hits = rank(queries, dets, k) if rank is not None else exact
    rec = {}
    for e, q in zip(exprs, queries, strict=True):
        d = dets.get(ds.instances[e.instance_id].image_id)
        if d is not None and len(d.scores):
            rec[e.id] = d.boxes[int(np.argmax(d.embeddings @ q))]
    sub = restrict(ds, split, kept) if gallery_images else ds
    report = evaluate({e.id: h for e, h in zip(exprs, hits, strict=True)}, sub, split, rec_boxes=rec)
    if rank is not None:
        reference = evaluate({e.id: h for e, h in zip(exprs, exact, strict=True)}, sub, split, rec_boxes=rec)
        report.meta["exact_protocol"] = reference.metrics
    report.probe = attribute_probe(dets, ds.instances_by_image())
    return report


def restrict(ds: Dataset, split: str, images: set[int]) -> Dataset:
    """The dataset seen through a gallery of only `images`: answers outside it dropped."""
    exprs = {}
    for e in ds.expressions.values():
        if gallery_split(e.split) != gallery_split(split) or ds.instances[e.instance_id].image_id not in images:
            continue
        ans = tuple(a for a in e.answers if ds.instances[a].image_id in images) if e.answers is not None else None
        exprs[e.id] = replace(e, answers=ans)
    imgs = {i: im for i, im in ds.images.items() if i in images}
    return replace(ds, images=imgs, expressions=exprs)
