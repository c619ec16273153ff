"""Pictures a person can check: an image with the target box and its expression."""

from __future__ import annotations

import textwrap

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from .coco import DataError
from .dataset import Dataset

GT_COLOR = (40, 220, 60)
OTHER_COLOR = (250, 200, 40)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def render_expression(ds: Dataset, expr_id: int, min_side: int = 384) -> PILImage.Image:
    """The image of an expression, scaled up, its target boxed, the text underneath."""
    if expr_id not in ds.expressions:
        raise DataError(f"{ds.root}: no expression with id {expr_id}")
    e = ds.expressions[expr_id]
    inst = ds.instances.get(e.instance_id)
    if inst is None:
        raise DataError(f"{ds.root}: expression {expr_id} points to unknown instance {e.instance_id}")
    path = ds.image_path(inst.image_id)
    try:
        with PILImage.open(path) as f:
            img = f.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None
    scale = max(1.0, min_side / min(img.size))
    img = img.resize((round(img.width * scale), round(img.height * scale)), PILImage.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(2, round(scale / 1.5))
    # Other instances the expression is also true of in this image (normally none).
    for a in e.answers or ():
        other = ds.instances.get(a)
        if other is not None and a != inst.id and other.image_id == inst.image_id:
            draw.rectangle([v * scale for v in other.box], outline=OTHER_COLOR, width=width)
    draw.rectangle([v * scale for v in inst.box], outline=GT_COLOR, width=width)
    font = _font(16)
    lines = [f"#{e.id} [{e.split}{', ' + e.type if e.type else ''}] image {inst.image_id}"]
    lines += textwrap.wrap(e.text, width=max(20, img.width // 9))
    if e.answers is not None:
        n = len(ds.answer_image_ids(e))
        lines.append(f"true in {n} gallery image{'s' if n != 1 else ''}")
    band = 8 + 20 * len(lines)
    out = PILImage.new("RGB", (img.width, img.height + band), (255, 255, 255))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        d.text((6, img.height + 4 + 20 * n), line, fill=(0, 0, 0), font=font)
    return out


def contact_sheet(tiles: list[PILImage.Image], cols: int = 4, pad: int = 6) -> PILImage.Image:
    """Tiles in a grid on white, each cell as large as the largest tile."""
    if not tiles:
        raise ValueError("no tiles")
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    cols = min(cols, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = PILImage.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for n, t in enumerate(tiles):
        sheet.paste(t, (pad + (n % cols) * (w + pad), pad + (n // cols) * (h + pad)))
    return sheet
