"""`reir demo`: the README's main job.

Until the engine and a trained bundle land, the demo generates a synthetic REIR
gallery, validates it, prints its statistics, draws sample expressions with their
target boxes, and scores a chance-level ranker so the metric's floor is visible.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def run_demo(out: Path, images: int = 300, seed: int = 0) -> int:
    from reir.engine.data import validate
    from reir.engine.data.show import contact_sheet, render_expression
    from reir.engine.data.stats import dataset_stats, format_stats
    from reir.engine.metrics import GalleryArrays, evaluate, rank_gallery
    from reir.engine.synth import SynthConfig, generate

    out = Path(out)
    t0 = time.perf_counter()
    ds, speed = generate(out / "data", SynthConfig(images=images, seed=seed), overwrite=True, progress=True)
    print(f"generated {images} images in {time.perf_counter() - t0:.1f} s ({speed:.0f} images/s)\n")
    problems = validate(ds)
    print(f"validate: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    print(format_stats(dataset_stats(ds)))

    test = sorted(ds.split_expressions("test"), key=lambda e: e.id)
    picks, seen = [], set()
    for e in test:  # one of each type first, then the rest in order
        if e.type not in seen:
            picks.append(e)
            seen.add(e.type)
    picks += [e for e in test if e not in picks][: max(0, 8 - len(picks))]
    print("\nsample test expressions (true in N gallery images):")
    for e in picks:
        print(f"  #{e.id:<5} {e.type:<12} N={len(ds.answer_image_ids(e)):<4} {e.text}")
    sheet = contact_sheet([render_expression(ds, e.id, min_side=256) for e in picks], cols=4)
    sheet.save(out / "samples.png")
    print(f"\nwrote {out / 'samples.png'} (target boxes in green)")

    # Chance level: random instance embeddings and queries, ranked by dot product.
    rng = np.random.default_rng(seed)
    gallery = set(ds.gallery_image_ids("test"))
    insts = [i for i in ds.instances.values() if i.image_id in gallery]
    arrays = GalleryArrays(
        rng.normal(size=(len(insts), 64)).astype(np.float32),
        np.array([i.image_id for i in insts]),
        np.array([i.box for i in insts]),
    )
    hits = rank_gallery(rng.normal(size=(len(test), 64)), arrays, k=100)
    report = evaluate({e.id: h for e, h in zip(test, hits, strict=True)}, ds, "test")
    print("\nchance-level ranker (random embeddings) on the test gallery:\n")
    print(report.table())
    return 0
