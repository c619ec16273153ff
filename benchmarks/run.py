"""`reir bench report`: every macro benchmark in one run, written as
benchmarks/results/<machine>-<date>.json + .md + figures (PNG, each naming its machine).

Sections: where the time goes (stages, indexing throughput), search at scale (the gallery's
index vs the exact scan, usearch HNSW and FAISS IVF at 50k/250k/1M instances, 10M with
--full; a filtered search), CLARE vs the two-stage pipeline by gallery size (accuracy
through the gallery's search and the exact protocol), and end-to-end serving (embedded,
Triton gRPC/HTTP) at concurrency 1/4/16. Results are written only when
every section finished (a partial run leaves `<name>.partial.json`, never a report).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from reir.engine.fsutil import write_json_atomic
from reir.engine.runtime.bundle import Bundle, default_bundle

from . import cluster, end_to_end, indexes, stages, two_stage
from .common import encoded_gallery, machine, machine_label
from .figures import figures
from .markdown import render

SECTIONS = ("stages", "indexes", "two_stage", "end_to_end", "cluster")


def slug(m: dict) -> str:
    gpu = re.sub(r"[^a-z0-9]+", "-", m["gpu"].split(",")[0].lower()).strip("-") if m.get("gpu") else "cpu"
    return f"{m['cores']}core-{gpu}"


def run_report(
    out: Path,
    bundle: Path | None = None,
    work: Path | None = None,
    full: bool = False,
    sections: tuple[str, ...] = SECTIONS,
    tiers: tuple[int, ...] | None = None,
    index_sizes: tuple[int, ...] | None = None,
    requests: int = 400,
    suffix: str = "",
) -> Path:
    """Run `sections` and write the report; returns the JSON path. `tiers`: gallery sizes
    (images) of the two-stage comparison, default 1k and 10k (+ 100k with `full`).
    `suffix`: appended to the report's name (a run of some sections beside a full one)."""

    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    bundle_path = Path(bundle or default_bundle())
    b = Bundle.open(bundle_path)
    m = machine()
    name = f"{slug(m)}-{datetime.now(UTC).date().isoformat()}" + (f"-{suffix}" if suffix else "")
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{name}.partial.json"
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="reir-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tiers = list(tiers or (1_000, 10_000))
    images = max(tiers)
    # --full: a 100k-image tier; exact answer sets for all its expressions would take hours,
    # so only the sampled ones get them
    big = 100_000 if full and images < 100_000 else None
    report: dict = {
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": m,
        "machine_label": machine_label(m),
        "command": "reir bench report"
        + (" --full" if full else "")
        + (f" --sections {','.join(sections)}" if tuple(sections) != SECTIONS else "")
        + (f" --index-sizes {','.join(map(str, index_sizes))}" if index_sizes else "")
        + (f" --name {suffix}" if suffix else "")
        + ("" if own_work else f" --work {work}"),
        # galleries and encodings found in --work are reused, and their time is not in the total
        "reused": []
        if own_work
        else sorted(p.name for p in work.iterdir() if p.name.startswith(("synth-", "encoded-"))),
        "bundle": {"path": str(bundle_path), "precision": b.manifest["precision"], "dim": b.dim},
        "seconds": {},
    }
    try:
        t0 = time.perf_counter()
        g = encoded_gallery(b, images, work)
        report["gallery"] = {"images": images, "instances": len(g.embeddings), "queries": len(g.queries)}
        report["seconds"]["encode_gallery"] = round(time.perf_counter() - t0, 1)
        for section in sections:
            t = time.perf_counter()
            print(f"== {section}", flush=True)
            if section == "stages":
                report["stages"] = {
                    "query": stages.query_stages(b, g, tiers[-1], work),
                    "image": stages.image_stages(b, g),
                    "indexing": stages.indexing_throughput(b, g),
                }
            elif section == "indexes":
                sizes = index_sizes or (indexes.FULL_SIZES if full else indexes.SIZES)
                report["indexes"] = indexes.run(g, b.query_sample(), sizes, work / "indexes")
            elif section == "two_stage":
                report["two_stage"] = two_stage.run(g, b, tiers, work)
                if big:
                    g_big = encoded_gallery(b, big, work, answer_sample=two_stage.N_ACCURACY)
                    report["two_stage"] += two_stage.run(g_big, b, [big], work)
            elif section == "end_to_end":
                e2e_work = work / "e2e"
                shutil.rmtree(e2e_work, ignore_errors=True)
                report["end_to_end"] = end_to_end.run(bundle_path, e2e_work, min(1000, images), requests)
            elif section == "cluster":
                cluster_work = work / "cluster"
                shutil.rmtree(cluster_work, ignore_errors=True)
                report["cluster"] = cluster.run(bundle_path, cluster_work, min(1000, images), requests)
            report["seconds"][section] = round(time.perf_counter() - t, 1)
            write_json_atomic(partial, report)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        pngs = figures(report, out)
        report["figures"] = [p.name for p in pngs]
        md = render(report)
        write_json_atomic(out / f"{name}.json", report)
        (out / f"{name}.md.tmp").write_text(md, encoding="utf-8")
        os.replace(out / f"{name}.md.tmp", out / f"{name}.md")
        partial.unlink(missing_ok=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"report: {out / name}.md ({report['seconds'].get('total', 0):.0f} s)")
    return out / f"{name}.json"


def rerender(json_path: Path) -> Path:
    """Figures and markdown again from a stored JSON (no measuring)."""
    report = json.loads(Path(json_path).read_text(encoding="utf-8"))
    names = [p.name for p in figures(report, json_path.parent)]
    if names != report.get("figures"):  # e.g. a panel added since, or a renamed report
        report["figures"] = names
        write_json_atomic(json_path, report)
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render(report), encoding="utf-8")
    return md_path
