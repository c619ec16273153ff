"""Instances kept per image: how many rows a gallery needs for the accuracy it has.

    python -m reir.benchmarks.instances [--bundle B] [--images 1000] [--out benchmarks/results]

The detector keeps up to the bundle's top-K (30) instances per image after NMS, where a
synthetic scene holds 3 to 8 objects; every stored instance is a row that every cost of
search grows with (stage-1 codes, memory, disk, build). A gallery created with `min_score`
(`reir index --min-score`) stores only the instances the detector scored at least that (each
image keeps its best). Per cut: the rows stored, and BR@1 / mBR@1 / mBR@10 / REC on the
benchmark's test gallery, every query searched through `Gallery.search` of a gallery built
with that cut (REC: the query's best instance among those its image kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from reir.engine.runtime.bundle import Bundle, default_bundle

from .common import KEYS, EncodedGallery, build_gallery, encoded_gallery, gallery_accuracy, publish

CUTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)


def run(bundle: Bundle, g: EncodedGallery, work: Path, cuts: tuple[float, ...] = CUTS) -> dict:
    rows = []
    for cut in tqdm(cuts, desc="score cuts", unit="gallery"):
        gallery = build_gallery(g, len(g.image_ids), work / f"cut-{cut}", bundle.query_sample(), min_score=cut)
        stored = gallery.info().instances
        row = {"min_score": cut, "instances": stored, "per_image": round(stored / len(g.image_ids), 2)}
        row |= {"share": round(stored / len(g.embeddings), 4)} | gallery_accuracy(g, gallery, g.queries)
        gallery.close()
        rows.append(row)
    return {"images": len(g.image_ids), "queries": len(g.queries), "rows": rows}


def markdown(report: dict) -> str:
    out = report["instances"]
    base = out["rows"][0]
    lines = [
        f"# Instances kept per image: {report['machine_label']}",
        "",
        f"`{report['command']}`, {report['date']}. The {out['images']:,}-image test gallery, "
        f"{out['queries']:,} expressions, each searched through `Gallery.search` of a gallery "
        "created with that `min_score`.",
        "",
        "| min_score | instances | per image | share of rows | BR@1 | mBR@1 | mBR@10 | REC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        deltas = " | ".join(f"{r[k]:.1f} ({r[k] - base[k]:+.1f})" for k in KEYS)
        lines.append(f"| {r['min_score']} | {r['instances']:,} | {r['per_image']} | {r['share']:.0%} | {deltas} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reir.benchmarks.instances", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("/tmp/reir-bench-instances"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    b = Bundle.open(a.bundle or default_bundle())
    g = encoded_gallery(b, a.images, a.work)
    publish("instances", run(b, g, a.work / "instances"), markdown, a.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
