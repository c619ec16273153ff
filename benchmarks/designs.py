"""The candidate index designs side by side, through the call a user makes.

    python -m benchmarks.designs --sizes 250000,1000000 [--work DIR] [--images 2000]

Per tier (whole images of the encoded benchmark gallery, jittered beyond it, as in the
search-at-scale section) and per registered design: a real gallery built with that design
(its own calibration picks its setting), then, on held-out test expressions, one query at a
time on one thread: `Gallery.search(q, k=10)` (agreement with the exact ranking over the
stored vectors, p50/p99), the same with `per_image=False` (instance recall@10), a batch of
16 queries in one call (time per query), and `Gallery.search(..., exact=True)` (the exact
scan, same path). Writes benchmarks/results/designs-<machine>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from reir.engine.fsutil import write_json_atomic
from reir.engine.runtime.bundle import Bundle, default_bundle
from reir.engine.search.candidates import DESIGNS

from .common import encoded_gallery, machine, machine_label, summarise_ms
from .indexes import QUERIES, build, measure

BATCH = 16


def tier(g, sample: np.ndarray, n: int, q: np.ndarray, work: Path, designs) -> list[dict]:
    rows = []
    for kind in designs:
        path = work / f"designs-{kind}-{n}"
        gal, build_s = build(g, n, sample, path, candidates=kind)
        store = gal.shards[0].index.store
        exact = store.top(q, 10 * store.max_per_image)  # the truth: the exact ranking over the stored vectors
        m = measure(lambda v, gal=gal: [h.instance_key - 1 for h in gal.search(v, k=10)[0]], store, q, exact)
        inst = measure(
            lambda v, gal=gal: [h.instance_key - 1 for h in gal.search(v, k=10, per_image=False)[0]], store, q, exact
        )
        per_query = []
        for s in range(0, len(q) - BATCH + 1, BATCH):
            t = time.perf_counter()
            gal.search(q[s : s + BATCH], k=10)
            per_query.append((time.perf_counter() - t) / BATCH)
        sub = q[:30]
        lat = []
        for v in sub:
            t = time.perf_counter()
            gal.search(v, k=10, exact=True)
            lat.append(time.perf_counter() - t)
        info = gal.info().per_shard[0].index
        rows.append(
            {
                "vectors": store.rows,
                "design": kind,
                "setting": info.candidates,
                "top1": m["top1"],
                "top10": m["top10"],
                "recall10": inst["recall10"],
                "p50_ms": m["p50_ms"],
                "p99_ms": m["p99_ms"],
                f"batch{BATCH}_ms_per_query": round(1000 * float(np.median(per_query)), 3),
                f"batch{BATCH}_speedup": round(m["p50_ms"] / (1000 * float(np.median(per_query))), 2),
                "exact_p50_ms": summarise_ms(lat)["p50_ms"],
                "calibration": info.agreement,
                "build_s": round(build_s, 1),
                "bytes_hot": info.bytes_per_instance["hot"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        gal.close()
        shutil.rmtree(path, ignore_errors=True)
        gc.collect()
    return rows


def markdown(report: dict) -> str:
    keys = [k for k in report["rows"][0] if k != "calibration"]
    lines = [
        f"# Candidate index designs: {report['name']}",
        "",
        f"Machine: {machine_label(report['machine'])}. Command: `{report['command']}`; {report['created']}.",
        "",
        f"{report['queries']} held-out test expressions per tier, one query at a time on one thread through "
        "`Gallery.search` (k = 10, best instance per image); truth = the exact ranking over the stored f16 "
        f"vectors; `batch{BATCH}` = one `Gallery.search` call with {BATCH} queries, time per query; `exact_p50_ms` "
        "= `Gallery.search(exact=True)` on 30 of the queries. Each design's setting is the one its own "
        "calibration chose on the gallery's query sample.",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
    ]
    for r in report["rows"]:
        cells = [
            json.dumps(r[k]) if isinstance(r[k], dict) else f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.designs", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="250000,1000000", help="tiers, in instances")
    p.add_argument("--images", type=int, default=2000, help="encoded benchmark images the tiers are drawn from")
    p.add_argument("--work", type=Path, default=Path("benchmarks/.work"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--designs", default=",".join(DESIGNS), help=f"of {', '.join(DESIGNS)}")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    bundle = Bundle.open(default_bundle())
    g = encoded_gallery(bundle, args.images, args.work)
    q = g.queries[np.random.default_rng(0).permutation(len(g.queries))[:QUERIES]].astype(np.float32)
    m = machine()
    report = {
        "name": f"{m['cores']}core-{datetime.now(UTC).date().isoformat()}",
        "machine": m,
        "command": f"python -m benchmarks.designs --sizes {args.sizes} --images {args.images} --designs {args.designs}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "queries": len(q),
        "rows": [],
    }
    for n in sizes:
        report["rows"] += tier(g, bundle.query_sample(), n, q, args.work, args.designs.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"designs-{report['name']}"
    write_json_atomic(stem.with_suffix(".json"), report)
    stem.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
