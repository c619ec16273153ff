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


def session(path: str | Path | bytes, device: str = "cpu", threads: int = 0):
    """An InferenceSession; `threads` 0 lets ORT choose (set it on small shared hosts). With
    `threads` set, ORT's idle threads sleep instead of spinning: on a host shared with the
    search and the request threads, a spinning pool takes the cores they need (measured:
    +30 % throughput of a batching server on 2 cores, 0.4 ms slower single calls)."""
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
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)  # a file, or a serialised graph
    return ort.InferenceSession(model, opts, providers=PROVIDERS[device])


def _fixed(dim) -> int | None:
    return dim if isinstance(dim, int) else None


class TextEncoder:
    """texts -> query vectors [N, D] float32, in batches of at most `batch`.

    A batch runs padded to its longest text. With a dynamic sequence axis, a batch of more
    than `BUCKET` texts is run in length-sorted runs of `BUCKET`, each padded only to its
    own longest (measured on 2 cores: 5.6 -> 5.0 ms per text at 16, 5.2 -> 4.3 at 32)."""

    BUCKET = 8

    def __init__(self, path: str | Path, tokenizer: Tokenizer, device: str = "cpu", threads: int = 0, batch: int = 64):
        self.sess = session(path, device, threads)
        self.tokenizer = tokenizer
        shape = self.sess.get_inputs()[0].shape
        self.static_batch = _fixed(shape[0])
        self.static_length = _fixed(shape[1]) if len(shape) > 1 else None
        self.batch = self.static_batch or batch
        self.dim = int(self.sess.get_outputs()[0].shape[-1])

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts)[0]

    def encode(self, texts: list[str], cleaned: bool = False) -> tuple[np.ndarray, list[bool]]:
        """Query vectors and, per text, whether it was truncated at the model's max length.
        `cleaned`: the texts already went through clean_expression (the engine's cache did it)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        truncated: list[bool] = []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            ids, mask, trunc = self.tokenizer(chunk, cleaned)
            truncated += trunc
            if self.static_batch or self.static_length or len(chunk) <= self.BUCKET:
                out[start : start + len(chunk)] = self._run(ids, mask)
                continue
            order = np.argsort(mask.sum(1), kind="stable")
            for part in np.array_split(order, -(-len(order) // self.BUCKET)):
                width = int(mask[part].sum(1).max())  # right-padded: the columns past it are all padding
                out[start + part] = self._run(ids[part, :width], mask[part, :width])
        return out, truncated

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        n = len(ids)
        if self.static_batch and n < self.static_batch:  # fixed-shape graphs: pad the batch
            ids = np.concatenate([ids, np.repeat(ids[-1:], self.static_batch - n, 0)])
            mask = np.concatenate([mask, np.repeat(mask[-1:], self.static_batch - n, 0)])
        return self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0][:n]


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
