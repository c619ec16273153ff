"""`reir demo`: the README's main job, end to end with the shipped model and no torch.

Generate a synthetic gallery with exact answers, index it with the default bundle (ONNX
Runtime + SQLite + the gallery's search index), run example expressions, print the ranked hits with whether
each is right, the box recall of the whole gallery and the per-query latency, and write a
contact sheet (PNG and HTML) a person can open.
"""

from __future__ import annotations

import html
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from reir.datasets.synth import SynthConfig, generate
from reir.engine.drawing import hits_sheet
from reir.engine.gallery.gallery import Gallery
from reir.engine.runtime.bundle import default_bundle
from reir.engine.runtime.engine import Engine
from reir.engine.serving.retriever import Retriever
from reir.evaluation import Hits, evaluate, pairwise_iou


def run_demo(out: Path, images: int = 300, seed: int = 0, bundle: Path | None = None, threads: int = 0) -> int:
    out = Path(out)
    t0 = time.perf_counter()
    engine = Engine.open(bundle or default_bundle(), threads=threads)
    m = engine.bundle.manifest
    probe = m["probe"]["onnx"]["mBR@1(0.5)"]
    print(f"model: {engine.bundle.path} ({m['precision']}, dim {engine.dim}; mBR@1 {probe:.1f} on its probe set)")
    ds, _ = generate(out / "data", SynthConfig(images=images, seed=seed, fractions=(0, 0, 1)), overwrite=True)
    gdir = out / "gallery"
    if gdir.exists():
        shutil.rmtree(gdir)
    gallery = Gallery.for_bundle(gdir, engine.bundle)
    paths = [ds.image_path(i) for i in sorted(ds.images)]
    rep = gallery.add_images(paths, engine, batch=32, progress=True)
    print(f"indexed {rep.added} images, {rep.instances} instances in {rep.seconds:.1f} s")
    ds_id = {str(Path(p).resolve()): i for i, p in zip(sorted(ds.images), paths, strict=True)}
    retriever = Retriever(engine, gallery)

    exprs = sorted(ds.split_expressions("test"), key=lambda e: e.id)
    engine.encode_text(["warm-up"])
    hits, latency = {}, []
    for e in exprs:  # one query at a time, as a user would: text encoding + one vector search
        t = time.perf_counter()
        found = retriever.search(e.text, k=10, per_image=False).hits
        latency.append(time.perf_counter() - t)
        hits[e.id] = found
    report = evaluate(
        {
            eid: Hits([ds_id[h.path] for h in hs], [h.box for h in hs], [h.score for h in hs])
            for eid, hs in hits.items()
        },
        ds,
        "test",
    )

    def correct(e, h) -> bool:
        answers = [ds.instances[a] for a in e.answers or (e.instance_id,)]
        boxes = [a.box for a in answers if a.image_id == ds_id[h.path]]
        return bool(boxes) and float(pairwise_iou(np.array([h.box]), np.array(boxes)).max()) >= 0.5

    picks, seen = [], set()
    for e in exprs:  # one of each expression type, then a few more
        if e.type not in seen:
            picks.append(e)
            seen.add(e.type)
    picks += [e for e in exprs if e not in picks][: max(0, 6 - len(picks))]
    sheets = []
    for e in picks:
        top = retriever.search(e.text, k=5).hits
        marks = [correct(e, h) for h in top]
        n_true = len(ds.answer_image_ids(e))
        print(f'\n"{e.text}"  ({e.type}; true in {n_true} of {images} images)')
        for rank, (h, ok) in enumerate(zip(top, marks, strict=True), 1):
            box = ", ".join(f"{v:.0f}" for v in h.box)
            print(f"  {rank}. {'correct' if ok else 'wrong  '}  score {h.score:7.3f}  {Path(h.path).name}  box ({box})")
        sheets.append((e, hits_sheet(e.text, top, marks)))
    gallery.close()

    lat = np.array(latency) * 1000
    mt = report.metrics
    print(f"\n{len(exprs)} queries over {images} images ({rep.instances} instances):")
    print("  box recall, multi-positive (a box right if IoU >= 0.5 with any instance the text is true of):")
    print(f"    mBR@1 {mt['mBR@1(0.5)']:.1f}   mBR@5 {mt['mBR@5(0.5)']:.1f}   mBR@10 {mt['mBR@10(0.5)']:.1f}")
    print(
        f"  official BR (only the annotated instance counts): BR@1 {mt['BR@1(0.5)']:.1f}  BR@10 {mt['BR@10(0.5)']:.1f}"
    )
    p50, p95 = np.median(lat), np.percentile(lat, 95)
    print(f"  per-query latency (text encoding + search): p50 {p50:.2f} ms, p95 {p95:.2f} ms")
    _write_sheets(out, sheets)
    print(f"\nwrote {out / 'demo.html'} and {out / 'demo.png'} (green: correct, red: wrong)")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


def _write_sheets(out: Path, sheets) -> None:
    width = max(s.width for _, s in sheets)
    total = PILImage.new("RGB", (width, sum(s.height for _, s in sheets)), (255, 255, 255))
    y = 0
    rows = []
    for n, (e, s) in enumerate(sheets):
        total.paste(s, (0, y))
        y += s.height
        s.save(out / f"query{n}.png")
        rows.append(f'<h3>{html.escape(e.text)} <small>({e.type})</small></h3><img src="query{n}.png">')
    total.save(out / "demo.png")
    (out / "demo.html").write_text(
        "<!doctype html><meta charset=utf-8><title>reir demo</title><body style='font-family:sans-serif'>"
        "<h1>clare-reir demo: top-5 images per expression</h1>" + "\n".join(rows) + "</body>\n",
        encoding="utf-8",
    )
