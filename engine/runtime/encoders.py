"""The bundle's two ONNX graphs in ONNX Runtime: query vectors from text, detections from pixels.

Execution providers: CPU by default; "cuda" and "tensorrt" use the onnxruntime-gpu
providers where installed (with CPU fallback for any node they do not take).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reir.engine.errors import ReirError
from reir.engine.runtime.tokenizer import Tokenizer

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class RuntimeUnavailable(ReirError):
    pass


def session(path: str | Path, device: str = "cpu", threads: int = 0):
    """An InferenceSession; `threads` 0 lets ORT choose (set it on small shared hosts)."""
    import onnxruntime as ort  # start-up: only where a graph runs

    if device not in PROVIDERS:
        raise ValueError(f"device must be one of {sorted(PROVIDERS)}, got {device!r}")
    missing = set(PROVIDERS[device]) - set(ort.get_available_providers())
    if missing:
        raise RuntimeUnavailable(
            f"device {device!r} needs {sorted(missing)}, but this onnxruntime has only "
            f"{ort.get_available_providers()} (install onnxruntime-gpu on a CUDA host)"
        )
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=PROVIDERS[device])


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) else None


class TextEncoder:
    """texts -> query vectors [N, D] float32, in batches of at most `batch`."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, device: str = "cpu", threads: int = 0, batch: int = 64):
        self.sess = session(path, device, threads)
        self.tokenizer = tokenizer
        shape = self.sess.get_inputs()[0].shape
        self.static_batch = _fixed(shape[0])
        self.batch = self.static_batch or batch
        self.dim = int(self.sess.get_outputs()[0].shape[-1])

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)[0]

    def encode(self, texts: list[str], cleaned: bool = False) -> tuple[np.ndarray, list[bool]]:
        """Query vectors and, per text, whether it was truncated at the model's max length.
        `cleaned`: the texts already went through clean_expression (the engine's cache did it)."""
        out, truncated = [], []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            ids, mask, trunc = self.tokenizer(chunk, cleaned)
            n = len(chunk)
            if self.static_batch and n < self.static_batch:  # fixed-shape graphs: pad the batch
                ids = np.concatenate([ids, np.repeat(ids[-1:], self.static_batch - n, 0)])
                mask = np.concatenate([mask, np.repeat(mask[-1:], self.static_batch - n, 0)])
            q = self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][:n]
            out.append(q.astype(np.float32, copy=False))
            truncated += trunc
        return (np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)), truncated


class VisualEncoder:
    """uint8 [B, H, W, 3] at the graph's input size -> (boxes, scores, embeddings, num_detections)."""

    def __init__(self, path: str | Path, device: str = "cpu", threads: int = 0):
        self.sess = session(path, device, threads)
        shape = self.sess.get_inputs()[0].shape
        self.static_batch = _fixed(shape[0])
        self.input_hw = (int(shape[1]), int(shape[2]))

    def __call__(self, images: np.ndarray):
        n = len(images)
        if self.static_batch is None:
            return tuple(self.sess.run(None, {"images": images}))
        parts = []
        for start in range(0, n, self.static_batch):
            chunk = images[start : start + self.static_batch]
            m = len(chunk)
            if m < self.static_batch:
                chunk = np.concatenate([chunk, np.zeros((self.static_batch - m, *chunk.shape[1:]), chunk.dtype)])
            parts.append([o[:m] for o in self.sess.run(None, {"images": chunk})])
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))
