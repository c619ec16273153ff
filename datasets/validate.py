"""Record-level checks and the `--skip-invalid` filter.

Every problem names the file, the record and what is wrong. Dropping a record
cascades: instances of a dropped image and expressions of a dropped instance go too,
so what remains is always self-consistent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from .dataset import Dataset, Problem

BOX_TOLERANCE = 0.5  # px: COCO boxes are rounded and may overhang by a fraction of a pixel


def validate(ds: Dataset, check_files: bool = True) -> list[Problem]:
    problems = list(ds.problems)
    fi, fa, fe = (ds.files.get(k, str(ds.root)) for k in ("images", "instances", "expressions"))
    for im in ds.images.values():
        if im.width <= 0 or im.height <= 0:
            problems.append(
                Problem(fi, "bad_image_size", f"image {im.id}", f"size {im.width}x{im.height}", ("images", im.id))
            )
        if check_files and not (ds.image_root / im.file).is_file():
            problems.append(
                Problem(fi, "missing_file", f"image {im.id}", f"{ds.image_root / im.file} not found", ("images", im.id))
            )
    for inst in ds.instances.values():
        where, key = f"annotation {inst.id}", ("instances", inst.id)
        x1, y1, x2, y2 = inst.box
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            problems.append(Problem(fa, "box_nonpositive", where, f"box xyxy {_fmt(inst.box)} has no area", key))
        im = ds.images.get(inst.image_id)
        if im is None:
            problems.append(
                Problem(fa, "unknown_image", where, f"image_id {inst.image_id} is not among the images", key)
            )
            continue
        t = BOX_TOLERANCE
        if x1 < -t or y1 < -t or x2 > im.width + t or y2 > im.height + t:
            problems.append(
                Problem(
                    fa, "box_outside_image", where, f"box xyxy {_fmt(inst.box)} outside {im.width}x{im.height}", key
                )
            )
    for e in ds.expressions.values():
        where, key = f"expression {e.id}", ("expressions", e.id)
        if not e.text.strip():
            problems.append(Problem(fe, "empty_text", where, "expression text is empty", key))
        if e.instance_id not in ds.instances:
            problems.append(Problem(fe, "unknown_instance", where, f"instance_id {e.instance_id} does not exist", key))
        for a in e.answers or ():
            if a not in ds.instances:
                problems.append(Problem(fe, "unknown_instance", where, f"answer instance {a} does not exist", key))
                break
    return problems


def drop_invalid(ds: Dataset, problems: list[Problem]) -> tuple[Dataset, Counter]:
    """A copy of `ds` without the records `problems` name (and what depends on them).

    Parse-time problems (malformed, duplicate_id) were already kept out of `ds`; they are
    counted here so the summary covers everything that was dropped.
    """
    bad = {p.key for p in problems if p.key is not None}
    bad_images = {k for t, k in bad if t == "images"}
    bad_insts = {k for t, k in bad if t == "instances"}
    bad_exprs = {k for t, k in bad if t == "expressions"}
    images = {k: v for k, v in ds.images.items() if k not in bad_images}
    instances = {k: v for k, v in ds.instances.items() if k not in bad_insts and v.image_id in images}
    expressions = {}
    for k, e in ds.expressions.items():
        if k in bad_exprs or e.instance_id not in instances:
            continue
        if e.answers is not None:
            e = replace(e, answers=tuple(a for a in e.answers if a in instances))
        expressions[k] = e
    out = replace(ds, images=images, instances=instances, expressions=expressions, problems=[])
    return out, Counter(p.kind for p in problems)


def _fmt(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
