"""The project's own format: COCO `instances.json` + plain-JSON `refs.json`.

Layout of a dataset directory::

    instances.json   COCO images/annotations/categories; images carry "split",
                     annotations may carry "attributes"; top-level "image_root"
    refs.json        {"format": "clare-reir/refs", "version": 1, "meta": {...},
                      "refs": [{"id", "instance_id", "text", "split",
                                "type"?, "novel"?, "logic"?, "answers"?}]}
    images/          the image files (or wherever "image_root" points)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reir.engine.fsutil import write_json_atomic

from .coco import DataError, Records, parse_annotations, parse_categories, parse_images, read_json, require_list
from .dataset import Dataset, Expression, xyxy_to_xywh

FORMAT = "clare-reir/refs"
VERSION = 1


def is_canonical(path: Path) -> bool:
    return path.is_dir() and (path / "refs.json").is_file() and (path / "instances.json").is_file()


def read_canonical(path: Path) -> Dataset:
    path = Path(path)
    inst_file, refs_file = path / "instances.json", path / "refs.json"
    coco = read_json(inst_file)
    refs = read_json(refs_file)
    if not isinstance(refs, dict) or refs.get("format") != FORMAT:
        raise DataError(f'{refs_file}: not a clare-reir refs file (expected "format": "{FORMAT}")')
    if refs.get("version") != VERSION:
        raise DataError(f"{refs_file}: format version {refs.get('version')!r} is not supported (expected {VERSION})")
    problems: list = []
    crec, rrec = Records(inst_file, problems), Records(refs_file, problems)
    image_root = path / str(coco.get("image_root", "images")) if isinstance(coco, dict) else path
    ds = Dataset(root=path, image_root=image_root, meta=dict(refs.get("meta") or {}), problems=problems)
    ds.files = {"images": str(inst_file), "instances": str(inst_file), "expressions": str(refs_file)}
    ds.images = parse_images(require_list(coco, "images", inst_file), crec)
    cats = parse_categories(coco.get("categories"))
    ds.instances = parse_annotations(require_list(coco, "annotations", inst_file), crec, cats)
    for n, r in enumerate(require_list(refs, "refs", refs_file)):
        where = f"ref {r['id']}" if isinstance(r, dict) and "id" in r else f"ref #{n}"
        rid = rrec.field(r, "id", int, where)
        inst = rrec.field(r, "instance_id", int, where)
        text = rrec.field(r, "text", str, where)
        split = rrec.field(r, "split", str, where)
        if None in (rid, inst, text, split):
            continue
        answers = r.get("answers")
        expr = Expression(
            id=rid,
            text=text,
            instance_id=inst,
            split=split,
            type=r.get("type"),
            novel=bool(r.get("novel", False)),
            logic=r.get("logic"),
            answers=tuple(int(a) for a in answers) if isinstance(answers, list) else None,
        )
        rrec.add_unique(ds.expressions, rid, expr, where)
    return ds


def dataset_to_json(ds: Dataset, image_root: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two JSON documents of the canonical format."""
    cat_names = sorted({i.category for i in ds.instances.values()})
    cat_ids = {name: n + 1 for n, name in enumerate(cat_names)}
    images = []
    for im in ds.images.values():
        rec: dict[str, Any] = {"id": im.id, "file_name": im.file, "width": im.width, "height": im.height}
        if im.split is not None:
            rec["split"] = im.split
        images.append(rec)
    anns = []
    for inst in ds.instances.values():
        xywh = [round(v, 3) for v in xyxy_to_xywh(inst.box)]
        rec = {
            "id": inst.id,
            "image_id": inst.image_id,
            "bbox": xywh,
            "area": round(xywh[2] * xywh[3], 3),
            "category_id": cat_ids[inst.category],
            "iscrowd": 0,
        }
        if inst.attributes:
            rec["attributes"] = inst.attributes
        anns.append(rec)
    coco = {
        "info": {"description": ds.meta.get("description", "clare-reir dataset")},
        "image_root": image_root,
        "images": images,
        "annotations": anns,
        "categories": [{"id": i, "name": n} for n, i in cat_ids.items()],
    }
    refs = []
    for e in ds.expressions.values():
        rec = {"id": e.id, "instance_id": e.instance_id, "text": e.text, "split": e.split}
        if e.type is not None:
            rec["type"] = e.type
        if e.novel:
            rec["novel"] = True
        if e.logic is not None:
            rec["logic"] = e.logic
        if e.answers is not None:
            rec["answers"] = list(e.answers)
        refs.append(rec)
    return coco, {"format": FORMAT, "version": VERSION, "meta": ds.meta, "refs": refs}


def write_canonical(ds: Dataset, out: Path, image_root: str = "images") -> None:
    """Write the canonical JSON files into an existing directory `out` (instances first, refs last,
    so a directory holding refs.json always has a complete instances.json beside it)."""
    coco, refs = dataset_to_json(ds, image_root)
    write_json_atomic(Path(out) / "instances.json", coco)
    write_json_atomic(Path(out) / "refs.json", refs)
