"""8-bit codes of every row's projection: the cheap re-scoring stage a design can share.

A design's stage 1 proposes a few thousand rows from 4-bit codes; these codes (one int8 per
query direction, scaled per direction) rank them again at about a tenth of the cost of an
exact score, so that only `rerank` rows reach the stored vectors.

    codes.i8    [rows, dims] int8 (append-only; the manifest says how many rows count)
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from reir.engine.fsutil import crc32_file
from reir.engine.search.vectors import Growable

RANGE_MARGIN = 1.25  # int8 scale: headroom over the training sample's largest magnitude
FILE = "codes.i8"


class Int8Codes:
    def __init__(self, scale: np.ndarray, codes: np.ndarray):
        self.scale = scale
        self.codes = Growable(codes)
        self._on_disk = 0  # rows codes.i8 holds on disk
        self._crc = 0  # CRC-32 of those rows

    @classmethod
    def fit(cls, y: np.ndarray) -> Int8Codes:
        """Empty codes scaled to a sample of projected rows `y` [n, dims]."""
        scale = (np.abs(y).max(0) * RANGE_MARGIN / 127.0).astype(np.float32)
        scale[scale == 0] = 1.0
        return cls(scale, np.empty((0, y.shape[1]), np.int8))

    @property
    def rows(self) -> int:
        return self.codes.n

    def add(self, y: np.ndarray) -> None:
        self.codes.append(np.clip(np.rint(y / self.scale), -127, 127).astype(np.int8))

    def rescore(self, qy: np.ndarray, rows: np.ndarray, keep: int) -> np.ndarray:
        """The `keep` best of `rows` for the projected query `qy`, best first."""
        if len(rows) > keep:
            # einsum, not BLAS: small products, and no BLAS threads to wake
            s = np.einsum("ij,j->i", self.codes.array[rows].astype(np.float32), qy * self.scale)
            top = np.argpartition(-s, keep - 1)[:keep]
            rows = rows[top[np.argsort(-s[top], kind="stable")]]
        return rows

    def save(self, root: Path, fresh: bool) -> dict[str, Any]:
        """Append the rows not yet on disk (`fresh`: a new training, start the file again)."""
        dims = self.codes.array.shape[1]
        if fresh:
            (root / FILE).write_bytes(b"")
            self._on_disk = self._crc = 0
        new = np.ascontiguousarray(self.codes.array[self._on_disk :]).tobytes()
        with open(root / FILE, "r+b") as f:
            f.truncate(self._on_disk * dims)
            f.seek(0, os.SEEK_END)
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        self._on_disk, self._crc = self.codes.n, zlib.crc32(new, self._crc)
        return {"codes_crc": self._crc, "scale": [float(v) for v in self.scale]}

    @classmethod
    def load(cls, root: Path, state: dict[str, Any], rows: int, dims: int, writable: bool) -> Int8Codes:
        """The committed `rows`; raises ValueError on any damage."""
        scale = np.asarray(state["scale"], np.float32)
        if scale.shape != (dims,):
            raise ValueError(f"{root}: int8 scale of {scale.shape[0]} dims for a {dims}-d query space")
        path = root / FILE
        if path.stat().st_size < rows * dims:
            raise ValueError(f"{path}: shorter than the {rows} rows the manifest commits")
        if crc32_file(path, rows * dims) != state["codes_crc"]:
            raise ValueError(f"{path}: its bytes do not match the manifest's checksum (damaged)")
        if writable:
            os.truncate(path, rows * dims)
        codes = cls(scale, np.fromfile(path, np.int8, rows * dims).reshape(rows, dims))
        codes._on_disk, codes._crc = rows, state["codes_crc"]
        return codes

    def memory_bytes(self) -> int:
        return int(self.codes.array.nbytes)
