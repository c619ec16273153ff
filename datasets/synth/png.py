"""A minimal, fast PNG writer for generated RGB images.

Pillow's encoder always runs adaptive per-row filtering, which costs about 1.3 ms
of the 2 ms it takes per 128x128 noisy image; the benchmark must write 200+
images/s on one core. Unfiltered rows with Huffman-only deflate encode in ~0.5 ms
for ~30% more bytes. Any PNG reader (Pillow included) decodes the result.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != np.uint8:
        raise ValueError("expected an HxWx3 uint8 array")
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 0  # filter type None on every row
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = z.compress(rows.tobytes()) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def write_png(path: Path, rgb: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(rgb))
