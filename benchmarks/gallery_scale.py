"""Engine at gallery scale: indexing throughput, size on disk, query latency, ANN recall.

    python -m reir.benchmarks.gallery_scale --images 4000 [--bundle models/synth] [--out DIR]

Indexes a freshly generated synthetic gallery (128x128) with the embedded engine, then runs
the test expressions one at a time (text encoding + one ANN search, as a user would) and
compares the ANN top-10 with exact search over the embeddings stored in SQLite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from reir.engine.cli import default_bundle
    from reir.engine.engine import Engine
    from reir.engine.gallery import Gallery
    from reir.engine.synth import SynthConfig, generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--out", type=Path, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="reir-scale-"))
    try:
        ds, _ = generate(work / "data", SynthConfig(images=args.images, seed=77, fractions=(0, 0, 1)), overwrite=True)
        engine = Engine.open(args.bundle or default_bundle(), threads=args.threads, batch=32)
        if (work / "g").exists():
            shutil.rmtree(work / "g")
        g = Gallery.create(work / "g", engine.dim, "f16", model=engine.model_id)
        rep = g.add_images([ds.image_path(i) for i in sorted(ds.images)], engine, progress=True)
        info = g.info()
        texts = [e.text for e in sorted(ds.split_expressions("test"), key=lambda e: e.id)][: args.queries]
        engine.encode_text(["warm-up"])
        lat = []
        for t in texts:
            engine._cache.clear()  # measure the text encoder every time, not the LRU cache
            t0 = time.perf_counter()
            g.search(engine.encode_text([t]), k=10, per_image=False)
            lat.append(time.perf_counter() - t0)
        emb = np.stack(
            [np.frombuffer(b, np.float32) for (b,) in g.db.execute("SELECT embedding FROM instances ORDER BY key")]
        )
        keys = np.array([k for (k,) in g.db.execute("SELECT key FROM instances ORDER BY key")])
        q = engine.encode_text(texts)
        recall = []
        for vec in q:
            exact = set(keys[np.argsort(-(emb @ vec))[:10]].tolist())
            ann = {h.instance_key for h in g.search(vec[None], k=10, per_image=False)[0]}
            recall.append(len(exact & ann) / 10)
        lat_ms = np.array(lat) * 1000
        row = {
            "images": rep.added,
            "instances": info["instances"],
            "index_images_per_s": round(rep.added / rep.seconds, 1),
            "bytes_on_disk": info["bytes_on_disk"],
            "bytes_per_100k_instances": round(info["bytes_on_disk"] * 1e5 / max(info["instances"], 1)),
            "query_p50_ms": round(float(np.median(lat_ms)), 2),
            "query_p95_ms": round(float(np.percentile(lat_ms, 95)), 2),
            "ann_recall@10_vs_exact": round(float(np.mean(recall)), 4),
            "threads": args.threads,
            "cores": os.cpu_count(),
        }
        g.close()
        print(json.dumps(row, indent=2))
        if args.json:
            from reir.engine.fsutil import write_json_atomic

            write_json_atomic(args.json, row)
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
