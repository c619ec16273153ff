"""Dataset statistics (`reir data stats`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from .dataset import Dataset


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(a.mean()), 2), "min": float(a.min()), "max": float(a.max())}


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    per_image = Counter(i.image_id for i in ds.instances.values())
    side = [np.sqrt(max(0.0, (b[2] - b[0]) * (b[3] - b[1]))) for b in (i.box for i in ds.instances.values())]
    out: dict[str, Any] = {
        "counts": ds.counts(),
        "categories": dict(Counter(i.category for i in ds.instances.values()).most_common()),
        "instances_per_image": _summary([per_image.get(i, 0) for i in ds.images]),
        "box_side_px": _summary(side),
        "splits": {},
    }
    for split in ds.splits():
        exprs = ds.split_expressions(split)
        words = [len(e.text.split()) for e in exprs]
        s: dict[str, Any] = {
            "gallery_images": len(ds.gallery_image_ids(split)),
            "expressions": len(exprs),
            "words_per_expression": _summary(words),
            "types": dict(sorted(Counter(e.type or "unknown" for e in exprs).items())),
        }
        if exprs and all(e.answers is not None for e in exprs):
            n_true = [len(ds.answer_image_ids(e)) for e in exprs]
            s["true_in_images"] = _summary(n_true)
            s["true_in_at_most_3"] = round(float(np.mean(np.asarray(n_true) <= 3)), 3)
        out["splits"][split] = s
    gen = ds.meta.get("generator")
    if gen:
        out["generator"] = gen
    return out


def format_stats(st: dict[str, Any]) -> str:
    c = st["counts"]
    lines = [
        f"images {c['images']}   instances {c['instances']}   expressions {c['expressions']}",
        f"instances/image mean {st['instances_per_image']['mean']} "
        f"(min {st['instances_per_image']['min']:g}, max {st['instances_per_image']['max']:g});  "
        f"box side px mean {st['box_side_px']['mean']} "
        f"(min {st['box_side_px']['min']:.0f}, max {st['box_side_px']['max']:.0f})",
        "categories: " + ", ".join(f"{k} {v}" for k, v in st["categories"].items()),
        "",
        f"{'split':<12}{'images':>8}{'exprs':>8}{'words':>7}  {'≤3 imgs':>8}  types",
    ]
    for name, s in st["splits"].items():
        frac = f"{100 * s['true_in_at_most_3']:.0f}%" if "true_in_at_most_3" in s else "–"
        types = ", ".join(f"{k} {v}" for k, v in s["types"].items())
        lines.append(
            f"{name:<12}{s['gallery_images']:>8}{s['expressions']:>8}{s['words_per_expression']['mean']:>7.1f}"
            f"  {frac:>8}  {types}"
        )
    if "generator" in st:
        g = st["generator"]
        lines += ["", f"generator {g.get('name')} v{g.get('version')} seed {g.get('seed')} size {g.get('size')}"]
    return "\n".join(lines)
