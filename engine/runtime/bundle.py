"""A deployable bundle: the directory `reir export` writes and every runtime reads.

    manifest.json         format, dims, input contract, precision, checksums, probe metrics
    text_encoder.onnx     input_ids, attention_mask (int64) -> query [B, D]
    visual_encoder.onnx   images uint8 [B, H, W, 3] -> boxes, scores, embeddings, num_detections
    *.optimized.onnx      the same graphs after ONNX Runtime's offline optimisation (CPU)
    tokenizer.json        for the `tokenizers` package
    query_sample.npy      optional: query vectors of training expressions [N, D] f16, which a
                          gallery fits its search index to (engine/query_space.py)

Opening a bundle verifies every file against the manifest's checksums, so a truncated
copy or a hand-edited graph is refused by name instead of giving silent wrong answers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from reir.engine.errors import ReirError
from reir.engine.runtime.encoders import TextEncoder, VisualEncoder
from reir.engine.runtime.tokenizer import Tokenizer

FORMAT = "clare-reir/bundle"
VERSION = 1


class BundleError(ReirError):
    pass


def default_bundle() -> Path:
    """The bundle shipped with the package (models/synth, exported from configs/synth.yaml)."""

    return Path(str(files("reir.models") / "synth"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        path = Path(path)
        mpath = path / "manifest.json"
        if not path.is_dir():
            raise BundleError(f"{path}: bundle directory not found")
        if not mpath.is_file():
            raise BundleError(f"{mpath}: missing (not a bundle written by `reir export`)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"{mpath}: unreadable ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not a clare-reir bundle manifest")
        if manifest.get("version") != VERSION:
            raise BundleError(f"{mpath}: bundle version {manifest.get('version')}, this reir reads {VERSION}")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        for name, meta in self.manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                raise BundleError(f"{f}: listed in the manifest but missing")
            if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
                raise BundleError(f"{f}: checksum mismatch (truncated or modified after export)")

    @property
    def model_id(self) -> str:
        """Names the embedding space (the hash of the checkpoint it was exported from):
        galleries remember it and refuse vectors or queries from another model."""
        return self.manifest["source"]["sha256"]

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def input_hw(self) -> tuple[int, int]:
        img = self.manifest["image"]
        return int(img["height"]), int(img["width"])

    def query_sample(self) -> np.ndarray | None:
        """The bundle's sample of query vectors (float32), or None for a bundle without one."""
        entry = self.manifest.get("query_sample")
        if not entry:
            return None
        f = self.path / entry["file"]
        try:
            sample = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"{f}: unreadable query sample ({e})") from None
        if sample.ndim != 2 or sample.shape[1] != self.dim:
            raise BundleError(f"{f}: query sample of shape {list(sample.shape)}, expected [N, {self.dim}]")
        return sample.astype(np.float32)

    def tokenizer(self) -> Tokenizer:
        t = self.manifest["text"]
        return Tokenizer(self.path / t["tokenizer"], t["max_length"], t["pad_id"], t["pad_token"], t["pad_to_max"])

    def graph(self, name: str, optimized: bool = False) -> Path:
        entry = self.manifest["graphs"][name]
        return self.path / (entry["optimized"] if optimized and entry.get("optimized") else entry["file"])

    def text_encoder(self, device: str = "cpu", threads: int = 0, optimized: bool | None = None) -> TextEncoder:
        opt = device == "cpu" if optimized is None else optimized  # the saved optimised graph is a CPU graph
        return TextEncoder(self.graph("text_encoder", opt), self.tokenizer(), device, threads)

    def visual_encoder(self, device: str = "cpu", threads: int = 0, optimized: bool | None = None) -> VisualEncoder:
        opt = device == "cpu" if optimized is None else optimized
        return VisualEncoder(self.graph("visual_encoder", opt), device, threads)
