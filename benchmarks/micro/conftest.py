"""Fixtures of the micro-benchmarks: the synth recipe's model in every runtime and precision.

Timings need the architecture, not the trained weights, so without a checkpoint
(`REIR_BENCH_CHECKPOINT`, else runs/synth_tt1/final.pt when present) the synth recipe's
model is built with its initial weights (pretrained MiniLM, the rest random). The graphs are
exported without accuracy gates: only their speed is measured here.

Environment: REIR_BENCH_DEVICE (cpu | cuda: where the PyTorch rows run), REIR_BENCH_THREADS,
REIR_BENCH_CHECKPOINT, REIR_BENCH_TEXT_ENCODER (a local HF text encoder directory).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from reir.benchmarks.common import machine

ROOT = Path(__file__).resolve().parents[2]
TEXT = "the small red circle left of the large blue star"


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["reir_machine"] = machine()
    output_json["reir_threads"] = int(os.environ.get("REIR_BENCH_THREADS", "0")) or os.cpu_count()
    output_json["reir_device"] = os.environ.get("REIR_BENCH_DEVICE", "cpu")


@pytest.fixture(scope="session")
def device() -> str:
    """Where the PyTorch eager rows run: REIR_BENCH_DEVICE=cuda on a GPU host (default cpu)."""
    dev = os.environ.get("REIR_BENCH_DEVICE", "cpu")
    if dev == "cuda":
        torch = pytest.importorskip("torch", reason="torch not installed (training extra)")
        if not torch.cuda.is_available():
            pytest.skip("REIR_BENCH_DEVICE=cuda but torch sees no GPU")
    return dev


@pytest.fixture(scope="session")
def threads() -> int:
    return int(os.environ.get("REIR_BENCH_THREADS", "0")) or (os.cpu_count() or 1)


@pytest.fixture(scope="session")
def synth_model():
    torch = pytest.importorskip("torch", reason="torch not installed (training extra)")
    from reir.training.config import load_config
    from reir.training.model import build_model

    ckpt = Path(os.environ.get("REIR_BENCH_CHECKPOINT", ROOT / "runs/synth_tt1/final.pt"))
    if ckpt.is_file():
        from reir.training.checkpoint import load_model

        cfg, model = load_model(ckpt)
    else:
        # REIR_BENCH_TEXT_ENCODER: a local HF directory in place of the MiniLM package (hosts without it)
        text = os.environ.get("REIR_BENCH_TEXT_ENCODER")
        cfg = load_config(ROOT / "configs/synth.yaml", {"model.text.encoder": text} if text else None)
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
    return cfg, model


@pytest.fixture(scope="session")
def graphs(synth_model, tmp_path_factory) -> dict[str, Path]:
    """fp32 / fp16 / int8 text graphs, fp32 / fp16 visual graphs, and the visual graph
    without NMS (raw per-query outputs) for the NMS comparison."""
    pytest.importorskip("onnx", reason="onnx not installed (export extra)")
    from reir.export.graphs import export_text, export_visual
    from reir.export.precision import to_fp16, to_int8

    cfg, model = synth_model
    out = tmp_path_factory.mktemp("graphs")
    hw = (cfg.model.image_size, cfg.model.image_size)
    export_text(model, out / "text_fp32.onnx", None, cfg.model.text.max_length)
    export_visual(model, out / "visual_fp32.onnx", hw, 30, 0.7)
    to_fp16(out / "text_fp32.onnx", out / "text_fp16.onnx")
    to_int8(out / "text_fp32.onnx", out / "text_int8.onnx")
    to_fp16(out / "visual_fp32.onnx", out / "visual_fp16.onnx")
    _export_raw_visual(model, out / "visual_raw.onnx", hw)
    return {p.stem: p for p in out.glob("*.onnx")}


def _export_raw_visual(model, path: Path, hw: tuple[int, int]) -> None:
    import torch

    from reir.training.box_ops import cxcywh_to_xyxy

    class Raw(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).float() / 255.0
            out = self.m.encode_image(x)
            scale = torch.tensor([hw[1], hw[0], hw[1], hw[0]], dtype=torch.float32)
            return cxcywh_to_xyxy(out["boxes"][-1]) * scale, out["objectness"][-1].sigmoid(), out["embeddings"][-1]

    x = torch.zeros((2, *hw, 3), dtype=torch.uint8)
    dyn = {n: {0: "batch"} for n in ("images", "boxes", "scores", "embeddings")}
    with torch.no_grad():
        torch.onnx.export(
            Raw(model).eval(),
            (x,),
            str(path),
            input_names=["images"],
            output_names=["boxes", "scores", "embeddings"],
            dynamic_axes=dyn,
            opset_version=17,
            dynamo=False,
        )


@pytest.fixture(scope="session")
def tokenizer(synth_model, tmp_path_factory):
    """The engine tokenizer of the synth recipe (tokenizer.json written as the exporter does)."""
    from reir.engine.runtime.tokenizer import Tokenizer
    from reir.training.text_branch import load_tokenizer

    cfg, _ = synth_model
    d = tmp_path_factory.mktemp("tok")
    load_tokenizer(cfg.model.text).save_pretrained(str(d))
    return Tokenizer(d / "tokenizer.json", cfg.model.text.max_length, 0, "[PAD]")


@pytest.fixture(scope="session")
def images(synth_model, tmp_path_factory) -> dict[int, np.ndarray]:
    """Real synthetic scenes (so NMS sees real detections) at the model's input size."""
    from reir.datasets.synth import SynthConfig, generate
    from reir.engine.runtime.image import read_rgb, resize_rgb

    cfg, _ = synth_model
    s = cfg.model.image_size
    ds, _ = generate(
        tmp_path_factory.mktemp("scenes") / "d", SynthConfig(images=32, seed=5, fractions=(0, 0, 1)), progress=False
    )
    base = np.stack([resize_rgb(read_rgb(ds.image_path(i)), s, s) for i in sorted(ds.images)])
    return {n: base[:n] for n in (1, 8, 32)}
