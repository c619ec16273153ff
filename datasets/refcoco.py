"""RefCOCO/RefCOCO+/RefCOCOg as shipped by the `refer` toolkit.

A directory holding `instances.json` (COCO) and `refs(<split_by>).p`. The refs file
is a Python pickle. Unpickling can run arbitrary code, so it is read with
:class:`RestrictedUnpickler`, which admits only the opcodes of plain data (dict,
list, tuple, str, bytes, int, float, bool, None) and refuses every class or
function reference: a pickle that tries to import anything fails with a clear error.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from .coco import DataError, Records, parse_annotations, parse_categories, parse_images, read_json, require_list
from .dataset import Dataset, Expression


class UnsafePickleError(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"refused to load '{module}.{name}': only plain containers, strings and numbers are allowed"
        )


def load_plain_pickle(path: Path) -> Any:
    """Load a pickle holding plain data only; never executes code from the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        # latin1 keeps Python 2 byte strings (the refer toolkit's pickles) decodable.
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except UnsafePickleError as e:
        raise DataError(f"{path}: unsafe pickle: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise DataError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None


def find_refs_file(path: Path, split_by: str | None = None) -> Path:
    if split_by is not None:
        f = path / f"refs({split_by}).p"
        if not f.is_file():
            raise DataError(f"{f}: file not found")
        return f
    found = sorted(path.glob("refs(*).p"))
    if not found:
        raise DataError(f"{path}: no refs(<split_by>).p file")
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise DataError(f"{path}: several refs files ({names}); choose one with --split-by")
    return found[0]


def is_refcoco(path: Path) -> bool:
    return path.is_dir() and (path / "instances.json").is_file() and any(path.glob("refs(*).p"))


def read_refcoco(path: Path, split_by: str | None = None, image_root: Path | None = None) -> Dataset:
    path = Path(path)
    inst_file = path / "instances.json"
    refs_file = find_refs_file(path, split_by)
    coco = read_json(inst_file)
    refs = load_plain_pickle(refs_file)
    if not isinstance(refs, list):
        raise DataError(f"{refs_file}: expected a list of refs, got {type(refs).__name__}")
    problems: list = []
    crec, rrec = Records(inst_file, problems), Records(refs_file, problems)
    ds = Dataset(
        root=path,
        image_root=Path(image_root) if image_root else path / "images",
        meta={"source": "refcoco", "refs_file": refs_file.name},
        problems=problems,
    )
    ds.files = {"images": str(inst_file), "instances": str(inst_file), "expressions": str(refs_file)}
    ds.images = parse_images(require_list(coco, "images", inst_file), crec, keep_split=False)
    ds.instances = parse_annotations(
        require_list(coco, "annotations", inst_file), crec, parse_categories(coco.get("categories"))
    )
    for n, r in enumerate(refs):
        where = f"ref {r['ref_id']}" if isinstance(r, dict) and "ref_id" in r else f"ref #{n}"
        ann_id = rrec.field(r, "ann_id", int, where)
        split = rrec.field(r, "split", str, where)
        sents = rrec.field(r, "sentences", list, where)
        if None in (ann_id, split, sents):
            continue
        for k, s in enumerate(sents):
            swhere = f"{where} sentence #{k}"
            sid = rrec.field(s, "sent_id", int, swhere)
            text = s.get("raw", s.get("sent")) if isinstance(s, dict) else None
            if sid is None:
                continue
            if not isinstance(text, str):
                rrec.report("malformed", swhere, "missing field 'raw' (or 'sent')")
                continue
            rrec.add_unique(ds.expressions, sid, Expression(sid, text, ann_id, split), f"{where} sentence {sid}")
    return ds
