"""`evaluate(predictions, dataset) -> Report`: the one evaluation entry point.

Every report is broken down by expression type, by phrasing (train vs novel) and by
how many gallery images the query is true in (1, 2-3, 4-10, >10), so an easy
majority cannot hide a weak model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reir.datasets.dataset import Dataset, Expression
from reir.engine.fsutil import write_json_atomic

from .failures import KINDS, diagnosable, top1_failures
from .ranking import Hits
from .retrieval import KS, TAUS, Outcome, box_recall, image_recall, outcome, rec_accuracy

STRATA = (("1", 1, 1), ("2-3", 2, 3), ("4-10", 4, 10), (">10", 11, None))
# Shown per group; the full k x tau grid is in `metrics`.
GROUP_KEYS = ("BR@1(0.5)", "BR@5(0.5)", "BR@10(0.5)", "mBR@1(0.5)", "mBR@10(0.5)", "IR@1", "REC@0.5")


def stratum(n_images: int) -> str:
    for name, lo, hi in STRATA:
        if n_images >= lo and (hi is None or n_images <= hi):
            return name
    return "0"


@dataclass
class Report:
    split: str
    n_queries: int
    metrics: dict[str, float]
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, dict[str, float]] = field(default_factory=dict)  # failures.top1_failures
    probe: dict[str, dict[str, float]] = field(default_factory=dict)  # probe.attribute_probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n_queries": self.n_queries,
            "metrics": self.metrics,
            "groups": self.groups,
            "meta": self.meta,
            "failures": self.failures,
            "probe": self.probe,
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def write(self, json_path: Path | None = None, md_path: Path | None = None) -> None:
        """The JSON (atomically) and/or the markdown tables, where asked for."""
        if json_path:
            write_json_atomic(json_path, self.to_dict())
        if md_path:
            Path(md_path).write_text(self.table() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        return cls(
            d["split"],
            d["n_queries"],
            dict(d["metrics"]),
            dict(d.get("groups", {})),
            dict(d.get("meta", {})),
            dict(d.get("failures", {})),
            dict(d.get("probe", {})),
        )

    def table(self) -> str:
        """Markdown: the k x tau grid (official and multi-positive), then the breakdowns."""
        lines = [f"split `{self.split}`, {self.n_queries} queries", ""]
        lines.append("| metric | " + " | ".join(f"τ={t} @{k}" for t in TAUS for k in KS) + " |")
        lines.append("|---" * (1 + len(TAUS) * len(KS)) + "|")
        for prefix, name in (("BR", "BR (official)"), ("mBR", "BR (multi-positive)"), ("BRimg", "BR (image-dedup)")):
            if f"{prefix}@1(0.5)" in self.metrics:
                cells = [f"{self.metrics[f'{prefix}@{k}({t})']:.2f}" for t in TAUS for k in KS]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        others = [k for k in self.metrics if "(" not in k]
        if others:
            lines += ["", " · ".join(f"{k} {self.metrics[k]:.2f}" for k in others)]
        if self.groups:
            keys = [k for k in GROUP_KEYS if any(k in g for g in self.groups.values())]
            lines += ["", "| group | n | " + " | ".join(keys) + " |", "|---" * (2 + len(keys)) + "|"]
            for name, g in self.groups.items():
                cells = [f"{g[k]:.2f}" if k in g else "–" for k in keys]
                lines.append(f"| {name} | {int(g['n'])} | " + " | ".join(cells) + " |")
        if self.failures:
            lines += ["", "Top-1 misses (multi-positive, IoU 0.5) by kind, in % of the misses:", ""]
            lines += ["| type | n | misses | " + " | ".join(KINDS) + " |", "|---" * (3 + len(KINDS)) + "|"]
            for name, f in self.failures.items():
                cells = [f"{f[k]:.1f}" if k in f else "–" for k in KINDS]  # older reports lack newer kinds
                lines.append(f"| {name} | {int(f['n'])} | {int(f['misses'])} | " + " | ".join(cells) + " |")
        if self.probe:
            cells = [f"{k} {p['accuracy']:.1f} (chance {p['chance']:.1f})" for k, p in self.probe.items()]
            n = int(next(iter(self.probe.values()))["n"])
            lines += ["", f"Instance embeddings, nearest-centroid accuracy per attribute (n={n}): " + " · ".join(cells)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _gt_official(ds: Dataset, e: Expression) -> dict[int, np.ndarray]:
    inst = ds.instances[e.instance_id]
    return {inst.image_id: np.asarray([inst.box])}


def _gt_multi(ds: Dataset, e: Expression) -> dict[int, np.ndarray]:
    by_image: dict[int, list] = {}
    for a in e.answers or ():
        inst = ds.instances[a]
        by_image.setdefault(inst.image_id, []).append(inst.box)
    return {i: np.asarray(b) for i, b in by_image.items()}


def _summarise(off: list[Outcome], multi: list[Outcome] | None, rec: list[bool] | None, full: bool) -> dict[str, float]:
    m: dict[str, float] = {"n": float(len(off))}
    taus = TAUS if full else (0.5,)
    for t in taus:
        for k in KS:
            m[f"BR@{k}({t})"] = box_recall(off, k, t)
            if multi is not None:
                m[f"mBR@{k}({t})"] = box_recall(multi, k, t)
            if full:
                m[f"BRimg@{k}({t})"] = box_recall(off, k, t, dedup=True)
    for k in KS if full else (1,):
        m[f"IR@{k}"] = image_recall(off, k)
        if multi is not None and full:
            m[f"mIR@{k}"] = image_recall(multi, k)
    if rec is not None:
        m["REC@0.5"] = 100.0 * float(np.mean(rec)) if rec else 0.0
    return m


def evaluate(
    predictions: Mapping[int, Hits],
    dataset: Dataset,
    split: str,
    rec_boxes: Mapping[int, np.ndarray] | None = None,
) -> Report:
    """Score ranked hits (expression id -> Hits) against `split` of `dataset`.

    A query with no entry in `predictions` counts as a miss. `rec_boxes` (expression id
    -> the one box predicted inside the query's own image) adds REC Acc@0.5.
    """
    exprs = sorted(dataset.split_expressions(split), key=lambda e: e.id)
    has_answers = bool(exprs) and all(e.answers is not None for e in exprs)
    empty = Hits(np.zeros(0), np.zeros((0, 4)), np.zeros(0))
    rows = []
    for e in exprs:
        hits = predictions.get(e.id, empty)
        off = outcome(hits, _gt_official(dataset, e))
        multi = outcome(hits, _gt_multi(dataset, e)) if has_answers else None
        rec = None
        if rec_boxes is not None:
            box = rec_boxes.get(e.id)
            gt = dataset.instances[e.instance_id].box
            rec = box is not None and rec_accuracy(np.asarray(box)[None], np.asarray(gt)[None]) > 0
        n_true = len(dataset.answer_image_ids(e))
        groups = [f"type={e.type or 'unknown'}", f"phrasing={'novel' if e.novel else 'train'}"]
        if has_answers:
            groups.append(f"true_in={stratum(n_true)}")
        rows.append((off, multi, rec, groups))

    def summarise(sel: list) -> dict[str, float]:
        return _summarise(
            [r[0] for r in sel],
            [r[1] for r in sel] if has_answers else None,
            [r[2] for r in sel] if rec_boxes is not None else None,
            full=sel is rows,
        )

    metrics = summarise(rows)
    metrics.pop("n")
    names = sorted({g for r in rows for g in r[3]}, key=_group_order)
    groups = {g: summarise([r for r in rows if g in r[3]]) for g in names}
    meta = {"multi_positive": has_answers, "gallery_images": len(dataset.gallery_image_ids(split))}
    failures = top1_failures(predictions, dataset, exprs) if diagnosable(dataset, exprs) else {}
    return Report(split, len(rows), metrics, groups, meta, failures)


def _group_order(name: str) -> tuple[int, int, str]:
    kind, _, value = name.partition("=")
    order = {"type": 0, "phrasing": 1, "true_in": 2}.get(kind, 3)
    strata = [s[0] for s in STRATA]
    return (order, strata.index(value) if value in strata else 0, value)
