"""Pictures a person can check: an image with the target box and its expression."""

from __future__ import annotations

import textwrap

from PIL import Image as PILImage

from reir.engine.drawing import GT_COLOR, OTHER_COLOR, boxed_tile

from .coco import DataError
from .dataset import Dataset


def render_expression(ds: Dataset, expr_id: int, min_side: int = 384) -> PILImage.Image:
    """The image of an expression, scaled up, its target boxed, the text underneath."""
    if expr_id not in ds.expressions:
        raise DataError(f"{ds.root}: no expression with id {expr_id}")
    e = ds.expressions[expr_id]
    inst = ds.instances.get(e.instance_id)
    if inst is None:
        raise DataError(f"{ds.root}: expression {expr_id} points to unknown instance {e.instance_id}")
    boxes = [
        (other.box, OTHER_COLOR)
        for a in e.answers or ()
        if (other := ds.instances.get(a)) is not None and a != inst.id and other.image_id == inst.image_id
    ]  # also true of these (normally none)
    lines = [f"#{e.id} [{e.split}{', ' + e.type if e.type else ''}] image {inst.image_id}"]
    text_lines = textwrap.wrap(e.text, width=40)
    if e.answers is not None:
        n = len(ds.answer_image_ids(e))
        text_lines.append(f"true in {n} gallery image{'s' if n != 1 else ''}")
    try:
        return boxed_tile(ds.image_path(inst.image_id), [*boxes, (inst.box, GT_COLOR)], lines + text_lines, min_side)
    except (OSError, ValueError) as err:
        raise DataError(f"{ds.image_path(inst.image_id)}: cannot read image ({err})") from None
