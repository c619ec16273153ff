"""CLARE end to end vs a two-stage pipeline, by gallery size: the paper's central claim.

- **CLARE**: the gallery's instances are embedded offline; a query is one text encoding
  and one search of a real `reir.engine.Gallery` (its index, candidates re-ranked exactly).
- **Two-stage**: what a user would build from an image retriever and a grounding model.
  Stage 1 ranks *images* by an image-level vector (here the mean of the image's instance
  embeddings, the analogue of a pooled global image feature), searched exactly (FAISS flat:
  the baseline gets the best first stage it could have);
  stage 2 runs the grounding model on each of the top-m images at query time (our visual
  encoder: read, resize, detect, score every candidate against the query) and ranks
  their instances. Stage 2 gives the images the same scores CLARE does, so any accuracy
  difference is what the image-level first stage loses, and the cost difference is the m
  model runs per query.

Accuracy (BR@k, official and multi-positive, τ = 0.5) on a fixed sample of test
expressions: CLARE through the gallery's search (the product path), and beside it the exact
protocol (every instance scored in memory); two-stage with exact ranking, stage 2's outputs
being the cached detections (identical to re-running the deterministic model). Latency
re-runs everything per query: text encoder (LRU cache bypassed), the search, and for
two-stage the image reads and the visual encoder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace

import faiss
import numpy as np
from tqdm import tqdm

from reir.engine.runtime.image import read_rgb, resize_rgb
from reir.evaluation import Hits, evaluate
from reir.evaluation.protocol import restrict

from .common import EncodedGallery, build_gallery, summarise_ms

KS = (1, 5, 10)
N_ACCURACY = 2000  # test expressions per gallery size for BR@k


def image_vectors(g: EncodedGallery, n_images: int) -> np.ndarray:
    """[n_images, D]: the mean instance embedding of each image (its dot product with a query
    is the image's mean instance score)."""
    sums = np.add.reduceat(g.embeddings[: g.offsets[n_images]], g.offsets[:n_images], axis=0)
    counts = np.diff(g.offsets[: n_images + 1])[:, None]
    return (sums / np.maximum(counts, 1)).astype(np.float32)


def _hits(g: EncodedGallery, inst: np.ndarray, scores: np.ndarray, k: int) -> Hits:
    if len(scores) > k:
        top = np.argpartition(-scores, k - 1)[:k]
        order = top[np.lexsort((top, -scores[top]))]  # ties in index order, as rank_gallery
    else:
        order = np.lexsort((np.arange(len(scores)), -scores))
    sel = inst[order]
    return Hits(g.instance_image[sel], g.boxes[sel], scores[order])


def accuracy(
    g: EncodedGallery, n_images: int, m: int, sample: np.ndarray, k: int = 100, gallery=None
) -> dict[str, dict]:
    """BR@k of both methods over the expressions `sample` (indices into g.expr_ids): "clare"
    through `gallery` (a Gallery of the first n_images, common.build_gallery) when given,
    "clare_exact" over arrays in memory, "two_stage"."""
    ds = g.dataset()
    kept = {int(i) for i in g.image_ids[:n_images]}
    sub = restrict(ds, "test", kept)
    n_inst = int(g.offsets[n_images])
    emb, img_vec = g.embeddings[:n_inst], image_vectors(g, n_images)
    preds = {"clare_exact": {}, "two_stage": {}} | ({"clare": {}} if gallery is not None else {})
    for qi in tqdm(sample, desc=f"accuracy at {n_images:,} images", unit="query"):
        q = g.queries[qi]
        scores = emb @ q
        preds["clare_exact"][int(g.expr_ids[qi])] = _hits(g, np.arange(n_inst), scores, k)
        if gallery is not None:
            found = gallery.search(q, k=k, per_image=False)[0]
            preds["clare"][int(g.expr_ids[qi])] = Hits(
                np.array([g.image_ids[h.image_id - 1] for h in found], np.int64),
                np.array([h.box for h in found]).reshape(-1, 4),
                np.array([h.score for h in found]),
            )
        top = np.argsort(-(img_vec @ q), kind="stable")[:m]
        inst = np.concatenate([np.arange(g.offsets[i], g.offsets[i + 1]) for i in top])
        preds["two_stage"][int(g.expr_ids[qi])] = _hits(g, inst, scores[inst], k)
    wanted = {int(g.expr_ids[i]) for i in sample}
    sub = _only(sub, wanted)
    out = {}
    for name, p in preds.items():
        metrics = evaluate(p, sub, "test").metrics
        out[name] = {key: round(metrics[key], 2) for key in metrics if "@" in key and key.endswith("(0.5)")}
    return out


def _only(ds, expr_ids: set[int]):
    return replace(ds, expressions={i: e for i, e in ds.expressions.items() if i in expr_ids})


def latency(g: EncodedGallery, bundle, gallery, n_images: int, m: int, texts: list[str], threads: int = 0) -> dict:
    """Per-query latency of both pipelines over `texts` (one query at a time)."""
    ds = g.dataset()
    text, visual = bundle.text_encoder(threads=threads), bundle.visual_encoder(threads=threads)
    h, w = bundle.input_hw
    img_index = faiss.IndexFlatIP(g.embeddings.shape[1])
    img_index.add(image_vectors(g, n_images))
    paths = [ds.image_path(int(i)) for i in g.image_ids[:n_images]]

    def clare(t: str) -> dict[str, float]:
        t0 = time.perf_counter()
        q = text([t])[0]
        t1 = time.perf_counter()
        gallery.search(q, k=10)
        return {"text": t1 - t0, "search": time.perf_counter() - t1}

    def two_stage(t: str) -> dict[str, float]:
        t0 = time.perf_counter()
        q = text([t])[0]
        t1 = time.perf_counter()
        top = img_index.search(q[None], m)[1][0]
        t2 = time.perf_counter()
        batch = np.stack([resize_rgb(read_rgb(paths[int(i)]), h, w) for i in top])
        t3 = time.perf_counter()
        boxes, _, emb, num = visual(batch)
        ranked = []  # (score, image, box) of each image's best instance: the two-stage answer
        for b in range(len(top)):
            sc = emb[b, : int(num[b])] @ q
            if len(sc):
                j = int(sc.argmax())
                ranked.append((float(sc[j]), int(top[b]), boxes[b, j]))
        ranked.sort(key=lambda r: -r[0])
        t4 = time.perf_counter()
        return {"text": t1 - t0, "search": t2 - t1, "read": t3 - t2, "ground": t4 - t3}

    out = {}
    for name, fn in (("clare", clare), ("two_stage", two_stage)):
        for t in texts[:3]:
            fn(t)
        parts = [fn(t) for t in tqdm(texts, desc=f"{name} latency at {n_images:,} images", unit="query")]
        total = summarise_ms([sum(p.values()) for p in parts])
        total["stages_p50_ms"] = {k: round(1000 * float(np.median([p[k] for p in parts])), 3) for k in parts[0]}
        out[name] = total
    out["clare"]["index_instances"] = int(g.offsets[n_images])
    out["clare"]["index"] = gallery.info().per_shard[0].index.kind
    return out


def run(
    g: EncodedGallery,
    bundle,
    tiers: list[int],
    work,
    m: int = 20,
    n_acc: int = N_ACCURACY,
    n_lat: int = 100,
) -> list[dict]:
    """One row per gallery size. Queries are drawn from the expressions with exact answer
    sets (all of them, or the generator's sample on a big gallery)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in tiers:
        own = {int(i) for i in g.image_ids[:n]}
        ds = g.dataset()
        exprs = [ds.expressions[int(e)] for e in g.expr_ids]
        eligible = np.array(
            [i for i, e in enumerate(exprs) if e.answers is not None and ds.instances[e.instance_id].image_id in own]
        )
        if not len(eligible):
            raise ValueError(f"no expression with an exact answer set in the first {n:,} images of {g.root}")
        sample = np.sort(rng.permutation(eligible)[:n_acc])
        gallery = build_gallery(g, n, work / f"two-stage-{n}", bundle.query_sample())
        acc = accuracy(g, n, m, sample, gallery=gallery)
        lat = latency(g, bundle, gallery, n, m, [g.texts[i] for i in sample[:n_lat]])
        gallery.close()
        shutil.rmtree(work / f"two-stage-{n}", ignore_errors=True)
        rows.append({"images": n, "m": m, "queries_accuracy": len(sample), "accuracy": acc, "latency": lat})
    return rows
