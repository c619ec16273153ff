"""COCO `instances.json` parsing shared by every reader.

Records that are malformed or duplicated are not raised on: they become
:class:`Problem` entries (naming file, record and field) and are left out, so
`reir data validate` can list every problem in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reir.engine.errors import ReirError

from .dataset import Image, Instance, Problem, xywh_to_xyxy


class DataError(ReirError):
    """A dataset cannot be read at all (missing file, not JSON, wrong layout)."""


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


def require_list(obj: Any, key: str, path: Path) -> list:
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    val = obj.get(key)
    if not isinstance(val, list):
        raise DataError(f"{path}: missing list field '{key}'")
    return val


class Records:
    """Typed field access that reports instead of raising."""

    def __init__(self, path: Path, problems: list[Problem]):
        self.file = str(path)
        self.problems = problems

    def report(self, kind: str, record: str, message: str) -> None:
        self.problems.append(Problem(self.file, kind, record, message))

    def field(self, rec: Any, name: str, types: type | tuple, record: str) -> Any:
        """`rec[name]` if present and of `types`, else None with a 'malformed' problem."""
        if not isinstance(rec, dict):
            self.report("malformed", record, f"expected an object, got {type(rec).__name__}")
            return None
        if name not in rec:
            self.report("malformed", record, f"missing field '{name}'")
            return None
        val = rec[name]
        if isinstance(val, bool) or not isinstance(val, types):
            want = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            self.report("malformed", record, f"field '{name}' should be {want}, got {val!r:.60}")
            return None
        return val

    def box(self, rec: dict, record: str) -> tuple[float, float, float, float] | None:
        bbox = self.field(rec, "bbox", list, record)
        if bbox is None:
            return None
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            self.report("malformed", record, f"field 'bbox' should be 4 numbers [x, y, w, h], got {bbox!r:.60}")
            return None
        return xywh_to_xyxy(bbox)

    def add_unique(self, table: dict, key: int, value: Any, record: str) -> None:
        if key in table:
            self.report("duplicate_id", record, f"id {key} already used by an earlier record")
            return
        table[key] = value


def parse_images(raw: list, rec: Records, keep_split: bool = True) -> dict[int, Image]:
    images: dict[int, Image] = {}
    for n, r in enumerate(raw):
        where = f"image #{n}" if not isinstance(r, dict) or "id" not in r else f"image {r['id']}"
        iid = rec.field(r, "id", int, where)
        file = rec.field(r, "file_name", str, where)
        w = rec.field(r, "width", (int, float), where)
        h = rec.field(r, "height", (int, float), where)
        if None in (iid, file, w, h):
            continue
        split = r.get("split") if keep_split and isinstance(r.get("split"), str) else None
        rec.add_unique(images, iid, Image(iid, file, int(w), int(h), split), where)
    return images


def parse_annotations(raw: list, rec: Records, categories: dict[int, str]) -> dict[int, Instance]:
    instances: dict[int, Instance] = {}
    for n, r in enumerate(raw):
        where = f"annotation #{n}" if not isinstance(r, dict) or "id" not in r else f"annotation {r['id']}"
        aid = rec.field(r, "id", int, where)
        image_id = rec.field(r, "image_id", int, where)
        box = rec.box(r, where) if isinstance(r, dict) else None
        if None in (aid, image_id, box):
            continue
        cat = categories.get(r.get("category_id"), str(r.get("category_id", "object")))
        attrs = r.get("attributes") if isinstance(r.get("attributes"), dict) else None
        rec.add_unique(instances, aid, Instance(aid, image_id, box, cat, attrs), where)
    return instances


def parse_categories(raw: Any) -> dict[int, str]:
    if not isinstance(raw, list):
        return {}
    return {c["id"]: str(c.get("name", c["id"])) for c in raw if isinstance(c, dict) and isinstance(c.get("id"), int)}
