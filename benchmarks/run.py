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
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reir.engine.fsutil import write_json_atomic
from reir.engine.runtime.bundle import Bundle, default_bundle

from . import cluster, end_to_end, indexes, serving, stages, two_stage
from .common import encoded_gallery, machine, machine_label, slug
from .figures import figures
from .markdown import render

SECTIONS = ("stages", "indexes", "two_stage", "end_to_end", "cluster", "serving")


@dataclass
class _Run:
    """What every section of one report run measures on."""

    bundle_path: Path
    bundle: Bundle
    gallery: Any  # the encoded benchmark gallery (common.EncodedGallery)
    work: Path
    tiers: list[int]
    index_sizes: tuple[int, ...] | None
    full: bool
    requests: int
    big: int | None  # --full: a 100k-image tier of the two-stage comparison

    @property
    def images(self) -> int:
        return max(self.tiers)


def _stages_section(r: _Run) -> dict:
    return {
        "query": stages.query_stages(r.bundle, r.gallery, r.tiers[-1], r.work),
        "image": stages.image_stages(r.bundle, r.gallery),
        "indexing": stages.indexing_throughput(r.bundle, r.gallery),
    }


def _indexes_section(r: _Run) -> dict:
    sizes = r.index_sizes or (indexes.FULL_SIZES if r.full else indexes.SIZES)
    return indexes.run(r.gallery, r.bundle.query_sample(), sizes, r.work / "indexes")


def _two_stage_section(r: _Run) -> list:
    rows = two_stage.run(r.gallery, r.bundle, r.tiers, r.work)
    if r.big:
        g_big = encoded_gallery(r.bundle, r.big, r.work, answer_sample=two_stage.N_ACCURACY)
        rows += two_stage.run(g_big, r.bundle, [r.big], r.work)
    return rows


def _served(module):
    def run(r: _Run) -> dict:
        where = r.work / module.__name__.rsplit(".", 1)[1]
        shutil.rmtree(where, ignore_errors=True)
        return module.run(r.bundle_path, where, min(1000, r.images), r.requests)

    return run


RUNNERS = {
    "stages": _stages_section,
    "indexes": _indexes_section,
    "two_stage": _two_stage_section,
    "end_to_end": _served(end_to_end),
    "cluster": _served(cluster),
    "serving": _served(serving),
}


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
    own_work = work is None
    work = Path(work or tempfile.mkdtemp(prefix="reir-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tiers = list(tiers or (1_000, 10_000))
    # --full: a 100k-image tier; exact answer sets for all its expressions would take hours,
    # so only the sampled ones get them
    big = 100_000 if full and max(tiers) < 100_000 else None
    command = _command(full, sections, index_sizes, suffix, None if own_work else work)
    report = _new_report(name, m, command, bundle_path, b, work, own_work)
    try:
        t0 = time.perf_counter()
        g = encoded_gallery(b, max(tiers), work)
        report["gallery"] = {"images": max(tiers), "instances": len(g.embeddings), "queries": len(g.queries)}
        report["seconds"]["encode_gallery"] = round(time.perf_counter() - t0, 1)
        run = _Run(bundle_path, b, g, work, tiers, index_sizes, full, requests, big)
        for section in sections:
            t = time.perf_counter()
            print(f"== {section}", flush=True)
            report[section] = RUNNERS[section](run)
            report["seconds"][section] = round(time.perf_counter() - t, 1)
            write_json_atomic(out / f"{name}.partial.json", report)
        report["seconds"]["total"] = round(time.perf_counter() - t0, 1)
        _publish(report, out, name)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"report: {out / name}.md ({report['seconds'].get('total', 0):.0f} s)")
    return out / f"{name}.json"


def _command(full: bool, sections, index_sizes, suffix: str, work: Path | None) -> str:
    """The command line that reproduces the run."""
    return (
        "reir bench report"
        + (" --full" if full else "")
        + (f" --sections {','.join(sections)}" if tuple(sections) != SECTIONS else "")
        + (f" --index-sizes {','.join(map(str, index_sizes))}" if index_sizes else "")
        + (f" --name {suffix}" if suffix else "")
        + (f" --work {work}" if work is not None else "")
    )


def _new_report(name: str, m: dict, command: str, bundle_path: Path, b: Bundle, work: Path, own_work: bool) -> dict:
    return {
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": m,
        "machine_label": machine_label(m),
        "command": command,
        # galleries and encodings found in --work are reused, and their time is not in the total
        "reused": []
        if own_work
        else sorted(p.name for p in work.iterdir() if p.name.startswith(("synth-", "encoded-"))),
        "bundle": {"path": str(bundle_path), "precision": b.manifest["precision"], "dim": b.dim},
        "seconds": {},
    }


def _publish(report: dict, out: Path, name: str) -> None:
    """Figures, JSON and markdown; only then is the partial file gone (never a half report)."""
    report["figures"] = [p.name for p in figures(report, out)]
    md = render(report)
    write_json_atomic(out / f"{name}.json", report)
    (out / f"{name}.md.tmp").write_text(md, encoding="utf-8")
    os.replace(out / f"{name}.md.tmp", out / f"{name}.md")
    (out / f"{name}.partial.json").unlink(missing_ok=True)


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
