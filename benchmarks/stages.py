"""Where the time goes: one query and one indexed image, stage by stage, and indexing
throughput by batch size and ONNX Runtime threads. All through `reir.engine`, the code a
user runs; per-stage times are medians over many single calls."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.engine import Engine
from reir.engine.runtime.image import read_rgb, resize_rgb

from .common import EncodedGallery, build_gallery, time_each


def _median_ms(seconds: list[float]) -> float:
    return round(1000 * float(np.median(seconds)), 3)


def query_stages(bundle, g: EncodedGallery, n_images: int, work: Path, n_queries: int = 200) -> dict:
    """tokenize → text encoder → index search (candidates, exact re-rank) → hit metadata
    (SQLite), one query at a time, on a gallery of `n_images` encoded benchmark images."""
    gal = build_gallery(g, n_images, work / f"stages-{n_images}", bundle.query_sample())
    tok, text = bundle.tokenizer(), bundle.text_encoder(threads=1)
    texts = [[t] for t in g.texts[:n_queries]]
    tokenize = time_each(tok, texts)
    encode = time_each(text, texts)  # includes tokenizing: subtracted below
    queries = text([t[0] for t in texts])
    ann = time_each(lambda q: gal.shards[0].index.search(q, 10, True, None, False), list(queries))
    total = time_each(lambda q: gal.search(q[None], k=10), list(queries))
    gal.close()
    tokenize_ms, encode_ms, ann_ms = _median_ms(tokenize), _median_ms(encode), _median_ms(ann)
    return {
        "gallery_images": n_images,
        "gallery_instances": int(g.offsets[n_images]),
        "tokenize_ms": tokenize_ms,
        "text_encoder_ms": round(encode_ms - tokenize_ms, 3),
        "ann_search_ms": ann_ms,
        "hit_metadata_ms": round(_median_ms(total) - ann_ms, 3),
    }


def image_stages(bundle, g: EncodedGallery, batch: int = 32, n_images: int = 256) -> dict:
    """Per image at batch 32: read + decode + resize, visual encoder (NMS in the graph)."""
    ds = g.dataset()
    h, w = bundle.input_hw
    paths = [ds.image_path(int(i)) for i in g.image_ids[:n_images]]
    t = time.perf_counter()
    arrays = [resize_rgb(read_rgb(p), h, w) for p in paths]
    read_s = (time.perf_counter() - t) / len(paths)
    visual = bundle.visual_encoder()
    batches = [np.stack(arrays[s : s + batch]) for s in range(0, len(arrays) - batch + 1, batch)]
    enc = time_each(visual, batches, warmup=1)
    return {
        "batch": batch,
        "read_resize_ms_per_image": round(1000 * read_s, 3),
        "visual_encoder_ms_per_image": round(_median_ms(enc) / batch, 3),
    }


def indexing_throughput(bundle, g: EncodedGallery, n_images: int = 256) -> list[dict]:
    """`Gallery.add_images` (hash, read, detect, SQLite + index) in images/s by batch and threads."""
    ds = g.dataset()
    paths = [ds.image_path(int(i)) for i in g.image_ids[:n_images]]
    cores = os.cpu_count() or 1
    rows = []
    for threads in sorted({1, cores}):
        for batch in (1, 8, 32):
            engine = Engine.open(bundle, threads=threads, batch=batch)
            with tempfile.TemporaryDirectory() as tmp:
                gal = Gallery.create(Path(tmp) / "g", engine.dim, "f16", model=engine.model_id)
                gal.add_images(paths[:batch], engine, batch=batch)  # warm-up (sessions, allocator)
                t = time.perf_counter()
                rep = gal.add_images(paths[batch:], engine, batch=batch)
                dt = time.perf_counter() - t
                gal.close()
            rows.append({"threads": threads, "batch": batch, "images_per_s": round(rep.added / dt, 1)})
    return rows
