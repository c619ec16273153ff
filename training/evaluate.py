"""PyTorch evaluation with the clean, text-free gallery protocol (docs/task-and-metrics.md).

The model runs through `postprocess.Detector` and `TextQuery`, the very modules the
exporter traces, and is scored by `reir.evaluation.protocol`, the code that also scores the
ONNX graphs and the serving engine: a gap between them can only come from the runtime.
"""

from __future__ import annotations

import numpy as np
import torch

from reir.datasets import Dataset
from reir.evaluation import Report
from reir.evaluation.protocol import DetectFn, EncodeTextFn, evaluate_retrieval

from .config import EvalConfig
from .model import CLARE
from .postprocess import Detector, TextQuery
from .text_branch import tokenize


def torch_detector(model: CLARE, cfg: EvalConfig) -> DetectFn:
    det = Detector(model, cfg.topk, cfg.nms_iou).eval()
    device = _device(model)

    @torch.no_grad()
    def detect(images: np.ndarray):
        return tuple(t.cpu().numpy() for t in det(torch.from_numpy(images).to(device)))

    return detect


def torch_text_encoder(model: CLARE, tokenizer, batch: int = 128) -> EncodeTextFn:
    query = TextQuery(model).eval()
    device = _device(model)

    @torch.no_grad()
    def encode(texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch):
            enc = tokenize(tokenizer, texts[start : start + batch], model.cfg.text.max_length, device=device)
            out.append(query(enc["input_ids"], enc["attention_mask"]).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)

    return encode


def _device(model: CLARE) -> torch.device:
    return next(model.parameters()).device


def evaluate_model(model: CLARE, tokenizer, ds: Dataset, split: str, cfg: EvalConfig, progress: bool = True) -> Report:
    model.eval()
    size = model.cfg.image_size
    report = evaluate_retrieval(
        torch_detector(model, cfg),
        torch_text_encoder(model, tokenizer),
        ds,
        split,
        (size, size),
        gallery_images=cfg.gallery_images,
        progress=progress,
    )
    report.meta["protocol"] = f"text-free gallery, NMS {cfg.nms_iou:.2f}, top-{cfg.topk}"
    return report
