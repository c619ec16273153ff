"""Image tags as posting lists, so a filter costs a lookup rather than a table scan.

SQLite keeps each image's tags (a JSON object); this is its inverted copy, built when a
gallery opens and kept up to date as images are added. A removed image needs no update:
it has no live rows left to return.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict

import numpy as np


class TagIndex:
    def __init__(self) -> None:
        self._lists: dict[tuple[str, str], list[int]] = defaultdict(list)
        self._arrays: dict[tuple[str, str], np.ndarray] = {}

    @classmethod
    def load(cls, db: sqlite3.Connection) -> TagIndex:
        index = cls()
        for image_id, tags in db.execute("SELECT id, tags FROM images WHERE tags != '{}' ORDER BY id"):
            index.add(image_id, json.loads(tags))
        return index

    def add(self, image_id: int, tags: dict[str, str] | None) -> None:
        for pair in (tags or {}).items():
            self._lists[pair].append(int(image_id))
            self._arrays.pop(pair, None)

    def images(self, tags: dict[str, str]) -> np.ndarray:
        """Ids of the images carrying every one of `tags`, ascending."""
        out = None
        for pair in tags.items():
            arr = self._arrays.get(pair)
            if arr is None:
                arr = self._arrays[pair] = np.unique(np.asarray(self._lists.get(pair, []), np.int64))
            out = arr if out is None else np.intersect1d(out, arr, assume_unique=True)
            if not len(out):
                break
        return out if out is not None else np.zeros(0, np.int64)
