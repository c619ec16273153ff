"""Reading gallery images: one decoder and one resize for training, export and serving.

The visual graph takes uint8 RGB already resized to its input size, so every consumer
must resize exactly as training did (Pillow bilinear, square, no letterbox). This module
is that single definition.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from reir.engine.errors import ReirError

MAX_PIXELS = 64_000_000  # refuse decompression bombs rather than exhaust memory


class ImageError(ReirError, ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def read_rgb(path: str | Path, data: bytes | None = None) -> PILImage.Image:
    """Decode an image fully (truncation fails here, not later). `data`: its bytes, already
    read (the indexer hashes them first); errors still name `path`."""
    path = Path(path)
    if data is None:
        try:
            size = path.stat().st_size
        except OSError as e:
            raise ImageError(f"{path}: cannot read ({e.strerror or e})") from None
    else:
        size = len(data)
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    try:
        with PILImage.open(io.BytesIO(data) if data is not None else path) as f:
            if f.width * f.height > MAX_PIXELS:
                raise ImageError(f"{path}: too large ({f.width}x{f.height} > {MAX_PIXELS:,} pixels)")
            return f.convert("RGB")
    except ImageError:
        raise
    except PILImage.UnidentifiedImageError:
        raise ImageError(f"{path}: not an image in a format Pillow reads") from None
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError) as e:
        raise ImageError(f"{path}: corrupt or truncated image ({e})") from None


def resize_rgb(img: PILImage.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3], Pillow bilinear (what training saw)."""
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ImageError(f"image array must be uint8 [H, W, 3] RGB, got {img.dtype} {list(img.shape)}")
        img = PILImage.fromarray(img)
    if img.size != (width, height):
        img = img.resize((width, height), PILImage.BILINEAR)
    return np.array(img, dtype=np.uint8)  # a writable copy


def load_rgb(path: str | Path, size: int) -> np.ndarray | None:
    """RGB uint8 [size, size, 3], or None when the file cannot be used (training skips it)."""
    try:
        return resize_rgb(read_rgb(path), size, size)
    except ImageError:
        return None
