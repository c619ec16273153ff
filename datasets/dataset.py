"""The one in-memory representation of a REIR dataset.

Every reader (canonical, RefCOCO, UNINEXT) produces a :class:`Dataset`; training,
evaluation and the engine consume only this. It is plain numpy/JSON so that a
serving host can use it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Box = tuple[float, float, float, float]  # xyxy, original-image pixels


@dataclass(frozen=True)
class Image:
    id: int
    file: str  # relative to Dataset.image_root
    width: int
    height: int
    split: str | None = None


@dataclass(frozen=True)
class Instance:
    id: int
    image_id: int
    box: Box
    category: str
    attributes: dict[str, str] | None = None  # shape/color/size/fill for synthetic data


@dataclass(frozen=True)
class Expression:
    id: int
    text: str
    instance_id: int
    split: str
    type: str | None = None  # attribute / location / relation / superlative
    novel: bool = False  # phrasing never seen in train (synthetic test-novel)
    logic: dict[str, Any] | None = None  # logical form (synthetic data)
    answers: tuple[int, ...] | None = None  # every instance in the split gallery it is true of


@dataclass(frozen=True)
class Problem:
    """One bad record, located precisely enough for a person to fix it."""

    file: str
    kind: str  # e.g. "box_outside_image", "unknown_image"
    record: str  # e.g. "annotation 17", "ref 4"
    message: str
    # Which record to drop under --skip-invalid: ("images"|"instances"|"expressions", id).
    # None for parse-time problems, whose records never entered the dataset.
    key: tuple[str, int] | None = None

    def __str__(self) -> str:
        return f"{self.file}: {self.record}: {self.kind}: {self.message}"


@dataclass
class Dataset:
    root: Path
    image_root: Path
    images: dict[int, Image] = field(default_factory=dict)
    instances: dict[int, Instance] = field(default_factory=dict)
    expressions: dict[int, Expression] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    # Problems met while parsing (malformed or duplicate records never enter the maps).
    problems: list[Problem] = field(default_factory=list)
    # The file each kind of record came from ("images", "instances", "expressions"),
    # so a problem found later still names its file.
    files: dict[str, str] = field(default_factory=dict)

    # -- views -----------------------------------------------------------------
    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.images[image_id].file

    def splits(self) -> list[str]:
        return sorted({e.split for e in self.expressions.values()})

    def split_expressions(self, split: str) -> list[Expression]:
        return [e for e in self.expressions.values() if e.split == split]

    def gallery_image_ids(self, split: str) -> list[int]:
        """Images that form the gallery of a split: those its expressions point into.

        The synthetic benchmark also records the split on each image, which makes
        images without expressions part of the gallery too (they are distractors).
        """
        split_images = {i.id for i in self.images.values() if i.split == gallery_split(split)}
        for e in self.split_expressions(split):
            inst = self.instances.get(e.instance_id)
            if inst is not None:
                split_images.add(inst.image_id)
        return sorted(split_images)

    def instances_by_image(self) -> dict[int, list[Instance]]:
        out: dict[int, list[Instance]] = {i: [] for i in self.images}
        for inst in self.instances.values():
            out.setdefault(inst.image_id, []).append(inst)
        return out

    def answer_image_ids(self, expr: Expression) -> set[int]:
        """Images the expression is true in: the exact set where known, else its own image."""
        ids = expr.answers if expr.answers is not None else (expr.instance_id,)
        return {self.instances[i].image_id for i in ids if i in self.instances}

    def counts(self) -> dict[str, int]:
        return {
            "images": len(self.images),
            "instances": len(self.instances),
            "expressions": len(self.expressions),
        }

    def split_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for split in self.splits():
            exprs = self.split_expressions(split)
            out[split] = {
                "images": len(self.gallery_image_ids(split)),
                "expressions": len(exprs),
            }
        return out


def gallery_split(split: str) -> str:
    """`test-novel` queries search the `test` gallery: same images, new phrasings."""
    return "test" if split == "test-novel" else split


def xywh_to_xyxy(b: list[float] | tuple[float, ...]) -> Box:
    x, y, w, h = (float(v) for v in b)
    return (x, y, x + w, y + h)


def xyxy_to_xywh(b: Box) -> list[float]:
    x1, y1, x2, y2 = b
    return [x1, y1, x2 - x1, y2 - y1]
