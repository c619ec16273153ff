"""Pictures of search results a person can check: boxes drawn on images, in a grid."""

from __future__ import annotations

import textwrap

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

GT_COLOR = (40, 220, 60)
OTHER_COLOR = (250, 200, 40)
WRONG_COLOR = (230, 40, 40)
HIT_COLOR = (40, 120, 250)


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def boxed_tile(
    path, boxes: list[tuple[tuple[float, ...], tuple[int, int, int]]], lines: list[str], min_side: int = 384
) -> PILImage.Image:
    """The image scaled up (nearest: pixels stay visible), boxes drawn, text lines underneath."""
    with PILImage.open(path) as f:
        img = f.convert("RGB")
    scale = max(1.0, min_side / min(img.size))
    img = img.resize((round(img.width * scale), round(img.height * scale)), PILImage.NEAREST)
    draw = ImageDraw.Draw(img)
    width = max(2, round(scale / 1.5))
    for box, color in boxes:
        draw.rectangle([v * scale for v in box], outline=color, width=width)
    font = _font(16)
    band = 8 + 20 * len(lines)
    out = PILImage.new("RGB", (img.width, img.height + band), (255, 255, 255))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        d.text((6, img.height + 4 + 20 * n), line, fill=(0, 0, 0), font=font)
    return out


def hits_sheet(expression: str, hits, correct: list[bool] | None = None, cols: int = 5) -> PILImage.Image:
    """Top hits of one query, each boxed (green: correct, red: wrong, blue: unknown), with a title."""
    tiles = []
    for rank, h in enumerate(hits, 1):
        ok = None if correct is None else correct[rank - 1]
        color = HIT_COLOR if ok is None else (GT_COLOR if ok else WRONG_COLOR)
        mark = "" if ok is None else (" correct" if ok else " wrong")
        tiles.append(
            boxed_tile(h.path, [(h.box, color)], [f"#{rank} score {h.score:.3f}{mark}", f"image {h.image_id}"], 192)
        )
    grid = contact_sheet(tiles, cols) if tiles else PILImage.new("RGB", (400, 40), (255, 255, 255))
    lines = textwrap.wrap(f'"{expression}"', width=max(30, grid.width // 9)) or [""]
    out = PILImage.new("RGB", (grid.width, grid.height + 8 + 22 * len(lines)), (255, 255, 255))
    d = ImageDraw.Draw(out)
    for n, line in enumerate(lines):
        d.text((8, 4 + 22 * n), line, fill=(0, 0, 0), font=_font(18))
    out.paste(grid, (0, 8 + 22 * len(lines)))
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
