"""What every benchmark shares: the machine record, latency summaries, and one encoded
synthetic gallery (generated, run through the visual encoder once, cached as .npz) that the
index, two-stage and stage benchmarks all draw from."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from reir.datasets import load_dataset
from reir.datasets.synth import SynthConfig, generate
from reir.engine.fsutil import write_json_atomic
from reir.engine.gallery.gallery import Gallery
from reir.engine.gallery.records import NewImage
from reir.engine.runtime.detections import Detections
from reir.engine.runtime.engine import Engine
from reir.engine.serving.retriever import Retriever
from reir.evaluation.protocol import encode_gallery
from reir.evaluation.ranking import Hits
from reir.evaluation.report import evaluate


def machine() -> dict[str, object]:
    """CPU, cores, memory, GPU and package versions: stored with every result."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        gpu = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    versions = {}
    for pkg in ("clare-reir", "numpy", "onnxruntime", "onnxruntime-gpu", "usearch", "faiss-cpu", "torch", "tokenizers"):
        with contextlib.suppress(PackageNotFoundError):
            versions[pkg] = version(pkg)
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_GiB": round(mem / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "os": platform.platform(),
        "versions": versions,
    }


def machine_label(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']}, {m['cores']} cores{gpu}"


def summarise_ms(seconds: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "n": len(ms),
    }


def time_each(fn: Callable, args: list, warmup: int = 3) -> list[float]:
    """Seconds per call of `fn(a)` for each `a`, after `warmup` calls."""
    for a in args[:warmup]:
        fn(a)
    out = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


def embedded_client(bundle, gallery) -> Callable:
    """A closed_loop client factory for the embedded engine: one Engine per thread over a
    shared gallery, its text cache cleared per query (Triton and Ray have none to hit)."""

    def make():
        e = Engine.open(bundle, threads=1)
        r = Retriever(e, gallery)

        def search(t):
            e._cache.clear()
            return r.search(t, k=10)

        return search

    return make


@dataclass
class EncodedGallery:
    """A synthetic gallery run through the visual encoder: every kept instance, and the
    test expressions with their query vectors (text encoder)."""

    root: Path  # the generated dataset
    image_ids: np.ndarray  # [N] gallery images
    offsets: np.ndarray  # [N + 1] instance range of each image
    embeddings: np.ndarray  # [I, D] float32
    boxes: np.ndarray  # [I, 4] original pixels
    scores: np.ndarray  # [I]
    instance_image: np.ndarray  # [I] image id of each instance
    expr_ids: np.ndarray  # [Q]
    texts: list[str]
    queries: np.ndarray  # [Q, D]
    _dataset: object = field(default=None, init=False, repr=False)

    def dataset(self):
        """The generated dataset, loaded once (2.5M instances at 100k images take a while)."""
        if self._dataset is None:
            self._dataset = load_dataset(self.root)
        return self._dataset


def encoded_gallery(
    bundle, images: int, work: Path, seed: int = 90, threads: int = 0, answer_sample: int = 0
) -> EncodedGallery:
    """Generate `images` test-gallery images, encode them (cached by bundle, size and seed).

    `answer_sample` N > 0 gives exact answer sets to N drawn expressions only: their cost
    grows with expressions x images (minutes at 10k images for all, hours at 100k)."""

    root = work / f"synth-{images}-{seed}-e1{f'-a{answer_sample}' if answer_sample else ''}"
    model = bundle.manifest["files"]["visual_encoder.onnx"]["sha256"][:12]
    # The answer sets do not change the images or expressions: one encoding serves every variant.
    cache = work / f"encoded-synth-{images}-{seed}-e1-{model}.npz"
    if not root.exists():  # written atomically: present means complete
        # Worker processes pay off only for big galleries (each starts a fresh interpreter).
        workers = min(8, os.cpu_count() or 1) if images >= 20_000 else 1
        # One expression per image: plenty of queries, and half the exact-answer work of the default.
        cfg = SynthConfig(
            images=images,
            seed=seed,
            fractions=(0, 0, 1),
            exprs_per_image=1,
            answer_sample=answer_sample,
            workers=workers,
        )
        generate(root, cfg, progress=True)
    ds = load_dataset(root)
    exprs = sorted(ds.split_expressions("test"), key=lambda e: e.id)
    texts = [e.text for e in exprs]
    if not cache.exists():
        ids = ds.gallery_image_ids("test")
        visual = bundle.visual_encoder(threads=threads)
        dets, problems = encode_gallery(visual, [ds.image_path(i) for i in ids], bundle.input_hw, batch=32)
        if problems:
            raise RuntimeError(f"benchmark gallery has unreadable images: {problems[:3]}")
        counts = np.array([len(d.scores) for d in dets])
        queries = bundle.text_encoder(threads=threads)(texts)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            image_ids=np.asarray(ids),
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            embeddings=np.concatenate([d.embeddings for d in dets]).astype(np.float32),
            boxes=np.concatenate([d.boxes for d in dets]),
            scores=np.concatenate([d.scores for d in dets]),
            instance_image=np.repeat(np.asarray(ids), counts),
            expr_ids=np.array([e.id for e in exprs]),
            queries=queries.astype(np.float32),
        )
        os.replace(tmp, cache)
    z = np.load(cache)
    if not np.array_equal(z["expr_ids"], [e.id for e in exprs]):
        raise RuntimeError(f"{cache} was encoded from another gallery than {root}: delete it")
    return EncodedGallery(
        root,
        z["image_ids"],
        z["offsets"],
        z["embeddings"],
        z["boxes"],
        z["scores"],
        z["instance_image"],
        z["expr_ids"],
        texts,
        z["queries"],
    )


def build_gallery(
    g: EncodedGallery, n_images: int, path: Path, sample: np.ndarray | None, tags: bool = False, min_score: float = 0.0
):
    """A real gallery (SQLite + index) of the first `n_images` encoded images, without running
    the visual encoder again. Its image ids are 1..n in order: image id i is g.image_ids[i - 1]."""

    shutil.rmtree(path, ignore_errors=True)
    gal = Gallery.create(path, g.embeddings.shape[1], "f16", model="benchmark", queries=sample, min_score=min_score)
    batch = []
    for j, image_id in enumerate(g.image_ids[:n_images]):
        lo, hi = g.offsets[j], g.offsets[j + 1]
        dets = Detections(g.boxes[lo:hi], g.scores[lo:hi], g.embeddings[lo:hi])
        batch.append(NewImage(f"{int(image_id)}", f"{int(image_id):064x}", 128, 128, 0, dets, None))
        if len(batch) == 2000:
            gal.add(batch, save_index=False)
            batch = []
    gal.add(batch, save_index=False)
    gal.save()
    return gal


KEYS = ("BR@1(0.5)", "mBR@1(0.5)", "mBR@10(0.5)", "REC@0.5")


def gallery_accuracy(g: EncodedGallery, gallery, queries: np.ndarray) -> dict[str, float]:
    """BR@1, mBR@1/10 through `gallery.search` (a `build_gallery` of all of g's images), and
    REC: the query's best instance among those its own image has in the gallery."""
    ds = g.dataset()
    stored = {int(im.path): im.detections for im in gallery.stored()}  # dataset image id -> what it kept
    preds, rec = {}, {}
    for qi, q in enumerate(queries):
        found = gallery.search(q, k=100, per_image=False)[0]
        eid = int(g.expr_ids[qi])
        preds[eid] = Hits(
            np.array([g.image_ids[h.image_id - 1] for h in found], np.int64),
            np.array([h.box for h in found]).reshape(-1, 4),
            np.array([h.score for h in found]),
        )
        own = stored[ds.instances[ds.expressions[eid].instance_id].image_id]
        rec[eid] = own.boxes[int(np.argmax(own.embeddings @ q))]
    metrics = evaluate(preds, ds, "test", rec_boxes=rec).metrics
    return {k: round(metrics[k], 2) for k in KEYS}


def publish(section: str, result: dict, render: Callable[[dict], str], out: Path, argv: list[str] | None) -> Path:
    """A one-section report of `python -m reir.benchmarks.SECTION`: JSON and markdown named
    by machine and date (then -2, -3, ... the same day), written beside the others in `out`;
    the markdown's path."""
    m = machine()
    report = {
        "machine": m,
        "machine_label": machine_label(m),
        "date": datetime.now(UTC).date().isoformat(),
        "command": " ".join([f"python -m reir.benchmarks.{section}", *(sys.argv[1:] if argv is None else argv)]),
        section: result,
    }
    name = base = f"{slug(m)}-{report['date']}-{section}"
    out.mkdir(parents=True, exist_ok=True)
    for n in range(2, 1000):  # a report committed earlier the same day is never overwritten
        if not (out / f"{name}.md").exists() and not (out / f"{name}.json").exists():
            break
        name = f"{base}-{n}"
    write_json_atomic(out / f"{name}.json", report)
    (out / f"{name}.md").write_text(render(report), encoding="utf-8")
    print(f"report: {out / name}.md")
    return out / f"{name}.md"


def slug(m: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", m["gpu"].split(",")[0].lower()).strip("-") if m.get("gpu") else "cpu"
    return f"{m['cores']}core-{gpu}"
