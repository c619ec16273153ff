"""UNINEXT-style grounding JSON (the layout REIRCOCO's files appear to use).

COCO-like, but `images[]` holds **one entry per referred object**: `{id, file_name,
width, height, expressions: [str, ...]}` with exactly one annotation each. The
same picture therefore appears once per referred object. We merge entries by
`file_name` into one image (the official evaluator de-duplicates the gallery by
path), keep one instance per entry, and one expression per string.
"""

from __future__ import annotations

from pathlib import Path

from .coco import DataError, Records, read_json, require_list
from .dataset import Dataset, Expression, Image, Instance


def is_uninext(path: Path) -> bool:
    if not (path.is_file() and path.suffix == ".json"):
        return False
    try:
        head = path.read_text(encoding="utf-8", errors="ignore")[:200_000]
    except OSError:
        return False
    return '"expressions"' in head


def split_from_name(path: Path) -> str:
    name = path.stem.lower()
    for split in ("train", "val", "test"):
        if split in name:
            return split
    return "test"


def read_uninext(path: Path, split: str | None = None, image_root: Path | None = None) -> Dataset:
    path = Path(path)
    raw = read_json(path)
    split = split or split_from_name(path)
    problems: list = []
    rec = Records(path, problems)
    ds = Dataset(
        root=path.parent,
        image_root=Path(image_root) if image_root else path.parent / "images",
        meta={"source": "uninext", "file": path.name, "split": split},
        problems=problems,
    )
    ds.files = {"images": str(path), "instances": str(path), "expressions": str(path)}
    entries: dict[int, dict] = {}
    for n, r in enumerate(require_list(raw, "images", path)):
        where = f"image {r['id']}" if isinstance(r, dict) and "id" in r else f"image #{n}"
        eid = rec.field(r, "id", int, where)
        file = rec.field(r, "file_name", str, where)
        w = rec.field(r, "width", (int, float), where)
        h = rec.field(r, "height", (int, float), where)
        exprs = rec.field(r, "expressions", list, where)
        if None in (eid, file, w, h, exprs):
            continue
        rec.add_unique(entries, eid, {"file": file, "w": int(w), "h": int(h), "expressions": exprs}, where)

    image_of_file: dict[str, int] = {}
    for eid, e in entries.items():
        if e["file"] not in image_of_file:
            image_of_file[e["file"]] = eid
            ds.images[eid] = Image(eid, e["file"], e["w"], e["h"], split)

    seen_entry: set[int] = set()
    next_expr = 0
    for n, a in enumerate(require_list(raw, "annotations", path)):
        where = f"annotation {a['id']}" if isinstance(a, dict) and "id" in a else f"annotation #{n}"
        aid = rec.field(a, "id", int, where)
        eid = rec.field(a, "image_id", int, where)
        box = rec.box(a, where) if isinstance(a, dict) else None
        if None in (aid, eid, box):
            continue
        entry = entries.get(eid)
        if entry is None:
            rec.report("unknown_image", where, f"image_id {eid} is not among the images")
            continue
        if eid in seen_entry:
            rec.report("malformed", where, f"image entry {eid} has more than one annotation (expected exactly one)")
            continue
        seen_entry.add(eid)
        if aid in ds.instances:
            rec.report("duplicate_id", where, f"id {aid} already used by an earlier record")
            continue
        ds.instances[aid] = Instance(aid, image_of_file[entry["file"]], box, "object")
        for k, text in enumerate(entry["expressions"]):
            if not isinstance(text, str):
                rec.report("malformed", f"image {eid} expression #{k}", f"expected a string, got {text!r:.60}")
                continue
            ds.expressions[next_expr] = Expression(next_expr, text, aid, split)
            next_expr += 1
    for eid in entries.keys() - seen_entry:
        rec.report("malformed", f"image {eid}", "has no annotation (expected exactly one)")
    if not entries and not ds.problems:
        raise DataError(f"{path}: no image entries")
    return ds
