"""The two ONNX graphs, traced from `training.postprocess` with the legacy exporter.

The legacy (TorchScript) exporter is used on purpose: it honours `BatchedNMS.symbolic`,
which emits ONNX `NonMaxSuppression` (docs/environment.md); the dynamo exporter fails on
the data-dependent NMS loop. Opset 17: GridSample (16) and LayerNormalization (17).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from reir.training.model import CLARE
from reir.training.postprocess import Detector, TextQuery

OPSET = 17
VISUAL_OUTPUTS = ["boxes", "scores", "embeddings", "num_detections"]


def export_text(model: CLARE, path: Path, static_batch: int | None = None, max_length: int = 40) -> None:
    batch = static_batch or 2
    ids = torch.full((batch, max_length if static_batch else 8), 101, dtype=torch.long)
    mask = torch.ones_like(ids)
    dynamic = None
    if not static_batch:
        dynamic = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask")} | {"query": {0: "batch"}}
    _export(TextQuery(model).eval(), (ids, mask), path, ["input_ids", "attention_mask"], ["query"], dynamic)


def export_visual(
    model: CLARE,
    path: Path,
    input_hw: tuple[int, int],
    topk: int,
    nms_iou: float,
    static_batch: int | None = None,
) -> None:
    x = torch.randint(
        0, 256, (static_batch or 2, *input_hw, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    dynamic = None if static_batch else {n: {0: "batch"} for n in ["images", *VISUAL_OUTPUTS]}
    _export(Detector(model, topk, nms_iou).eval(), (x,), path, ["images"], VISUAL_OUTPUTS, dynamic)


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], dynamic) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    check(path)


def check(path: Path) -> None:
    """onnx.checker + shape inference, written back so consumers see every shape."""
    onnx.checker.check_model(str(path), full_check=True)
    onnx.shape_inference.infer_shapes_path(str(path), str(path), check_type=True, strict_mode=True)


def optimize(path: Path, out: Path) -> None:
    """An offline ORT-optimised copy (extended level: portable across CPUs, fast start-up)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
