"""`Engine`: a bundle opened in ONNX Runtime — text to query vectors, images to instances.

engine = Engine.open("models/synth")
q = engine.encode_text(["the small red circle left of the blue star"])   # [1, D]
dets = engine.detect(["a.png", "b.jpg"])                                    # boxes in original pixels
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from reir.engine.runtime.bundle import Bundle
from reir.engine.runtime.detections import Detections, unpad
from reir.engine.runtime.encoders import TextEncoder, VisualEncoder
from reir.engine.runtime.expressions import clean_expression
from reir.engine.runtime.image import ImageError, read_rgb, resize_rgb


class Engine:
    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0, batch: int = 16, cache: int = 4096):
        """Each graph loads on first use: a search front end never pays for the detector
        (most of an engine's memory and most of its start-up), an indexer never for text."""
        self.bundle = bundle
        self.device = device
        self.threads = threads
        self.batch = batch
        self._text = self._visual = None
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache

    @classmethod
    def open(
        cls, bundle: str | Path | Bundle, device: str = "cpu", threads: int = 0, batch: int = 16, cache: int = 4096
    ) -> Engine:
        """`cache`: query vectors kept for repeated texts (0: none, as a load test wants)."""
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        return cls(b, device, threads, batch, cache)

    @property
    def text(self) -> TextEncoder:
        if self._text is None:
            self._text = self.bundle.text_encoder(self.device, self.threads)
        return self._text

    @property
    def visual(self) -> VisualEncoder:
        if self._visual is None:
            self._visual = self.bundle.visual_encoder(self.device, self.threads)
        return self._visual

    @property
    def dim(self) -> int:
        return self.bundle.dim

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def query_sample(self) -> np.ndarray | None:
        """Query vectors of the bundle's training expressions: what a gallery fits its index to."""
        if not hasattr(self, "_sample"):
            self._sample = self.bundle.query_sample()
        return self._sample

    def encode_text(self, texts: list[str]) -> np.ndarray:
        """Query vectors [N, D]; repeated texts (after cleaning) come from an LRU cache."""
        return self.encode(texts)[0]

    def encode(self, texts: list[str]) -> tuple[np.ndarray, list[bool]]:
        """Query vectors [N, D] and, per text, whether it was truncated at the model's max
        length. Each text is cleaned once: the cache key is what the tokenizer encodes."""
        keys = [clean_expression(t) for t in texts]
        found = {k: self._cache[k] for k in keys if k in self._cache}
        todo = sorted(set(keys) - set(found))
        if todo:
            vecs, truncated = self.text.encode(todo, cleaned=True)
            found.update((k, (v, c)) for k, v, c in zip(todo, vecs, truncated, strict=True))
        for k in keys:  # most recent last; the oldest leave past the cache's size
            self._cache[k] = found[k]
            self._cache.move_to_end(k)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        if not keys:
            return np.zeros((0, self.dim), np.float32), []
        return np.stack([found[k][0] for k in keys]), [found[k][1] for k in keys]

    def detect(self, images: list) -> list[Detections]:
        """Per image (a path, a decoded PIL image, or a uint8 RGB array [H, W, 3]): kept
        instances, boxes in its own pixels.

        Raises ImageError naming the image when one cannot be read."""
        out: list[Detections] = []
        for start in range(0, len(images), self.batch):
            prepared = [self.prepare(img) for img in images[start : start + self.batch]]
            out += self.detect_prepared(np.stack([a for a, _ in prepared]), [s for _, s in prepared])
        return out

    def prepare(self, img) -> tuple[np.ndarray, tuple[int, int]]:
        """An image resized to the graph's input (uint8 [h, w, 3]) and its own (width, height).
        Split from detect() so that a cluster decodes and resizes in CPU tasks and runs the
        graph in an actor pool."""
        h, w = self.bundle.input_hw
        pil = read_rgb(img) if isinstance(img, str | Path) else img
        if isinstance(pil, np.ndarray):
            if pil.ndim != 3 or pil.shape[2] != 3:
                raise ImageError(f"image array must be [H, W, 3] RGB, got {list(pil.shape)}")
            size = (pil.shape[1], pil.shape[0])
        else:
            size = pil.size
        return resize_rgb(pil, h, w), size

    def detect_prepared(self, arrays: np.ndarray, sizes: list[tuple[int, int]]) -> list[Detections]:
        """The visual graph on prepared images [N, h, w, 3]; boxes in each image's own pixels."""
        out: list[Detections] = []
        for start in range(0, len(arrays), self.batch):
            part = arrays[start : start + self.batch]
            out += unpad(self.visual(part), sizes[start : start + self.batch], self.bundle.input_hw)
        return out
