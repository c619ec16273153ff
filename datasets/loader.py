"""One entry point that recognises the three formats."""

from __future__ import annotations

from pathlib import Path

from .canonical import is_canonical, read_canonical
from .coco import DataError
from .dataset import Dataset
from .refcoco import is_refcoco, read_refcoco
from .uninext import is_uninext, read_uninext

FORMATS = ("canonical", "refcoco", "uninext")


def detect_format(path: Path) -> str:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if is_canonical(path):
        return "canonical"
    if is_refcoco(path):
        return "refcoco"
    if is_uninext(path):
        return "uninext"
    raise DataError(
        f"{path}: not a known dataset layout (expected a directory with instances.json + refs.json, "
        "a directory with instances.json + refs(<split_by>).p, or a UNINEXT grounding .json file)"
    )


def load_dataset(
    path: Path | str,
    fmt: str | None = None,
    *,
    split_by: str | None = None,
    images: Path | None = None,
    split: str | None = None,
) -> Dataset:
    """Read any supported format into a :class:`Dataset` (problems recorded, not raised)."""
    path = Path(path)
    fmt = fmt or detect_format(path)
    if fmt == "canonical":
        return read_canonical(path)
    if fmt == "refcoco":
        return read_refcoco(path, split_by=split_by, image_root=images)
    if fmt == "uninext":
        return read_uninext(path, split=split, image_root=images)
    raise DataError(f"unknown format {fmt!r} (choose one of {', '.join(FORMATS)})")
