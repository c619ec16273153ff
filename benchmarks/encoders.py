"""The query encoder: what each form of the bundle's text graph costs on one thread, and what
it does to retrieval through the gallery's real search.

    python -m reir.benchmarks.encoders [--bundle B] [--teacher T] [--images 1000] [--out benchmarks/results]

`--teacher T` puts a bundle's fp32 text graph first, as the row every other is compared with:
the shipped bundle's distilled tower against the tower it was taught by
(`--teacher models/synth-teacher`, export/distill_text.py). The other variants are derived
from the bundle's own text graph (no checkpoint needed):

| variant | what |
|---|---|
| `fp32` | the graph as the bundle computes it (w16 weights folded to the fp32 they run as) |
| `ort-fused` | ONNX Runtime's transformer fusion (onnxruntime.transformers, BERT patterns) |
| `int8-tensor` | dynamic int8, one scale per tensor, every product (the export's recipe before) |
| `int8-channel` | one scale per output channel, the text head fp32 |
| `int8-export` | `int8-channel` with the most sensitive sixth of the products fp32 (`reir export cpu-text`) |
| `nbits8-b32` | MatMulNBits: 8-bit weights in blocks of 32, int8 compute (accuracy level 4) |

Per variant: p50/p99 of one expression on one thread (tokenizing included, as a query pays),
the cost per expression in a batch of 16, query cosine to `fp32` (mean, min), and
BR@1 / mBR@1 / mBR@10 / REC on the test gallery (the benchmark's 1,000 images, seed 90),
each query searched through `Gallery.search`. Timings of one run compare; across runs this
machine moves by tens of percent.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from reir.datasets import load_dataset
from reir.engine.runtime.bundle import Bundle, default_bundle
from reir.engine.runtime.encoders import TextEncoder
from reir.export.cpu_text import fp32_text_graph, quantize_text, sensitivity_texts
from reir.export.gates import probe_set
from reir.export.precision import TEXT_HEAD, int8_candidates
from reir.export.text_from_graph import tower_depth

from .common import KEYS, EncodedGallery, build_gallery, encoded_gallery, gallery_accuracy, publish

VARIANTS = ("fp32", "ort-fused", "int8-tensor", "int8-channel", "int8-export", "nbits8-b32")


def _fused(fp32: Path, dst: Path) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(fp32), model_type="bert", num_heads=0, hidden_size=0)  # 0: read from the graph
    opt.save_model_to_file(str(dst))
    return {"fused": {k: v for k, v in opt.get_fused_operator_statistics().items() if v}}


def _dynamic(fp32: Path, dst: Path, per_channel: bool, nodes: list[str] | None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(dst),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm", "Gather"] if nodes is None else ["MatMul"],
        nodes_to_quantize=nodes,
        per_channel=per_channel,
    )
    return {"products": "every MatMul/Gemm/Gather" if nodes is None else len(nodes)}


def _nbits(fp32: Path, dst: Path) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tower = int8_candidates(onnx.load(str(fp32)))
    q = MatMulNBitsQuantizer(
        onnx.load(str(fp32)), bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_include=tower
    )
    q.process()
    q.model.save_model_to_file(str(dst))
    return {"products": len(tower)}


def build(bundle: Bundle, variants: tuple[str, ...], texts: list[str], work: Path) -> dict[str, tuple[Path, dict]]:
    """{variant: (graph, what was done)}; `texts` rank the products for `int8-export`."""
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32.onnx"
    fp32_text_graph(bundle, fp32)
    tower = int8_candidates(onnx.load(str(fp32)))
    make: dict[str, Callable[[Path], dict]] = {
        "fp32": lambda dst: {},
        "ort-fused": lambda dst: _fused(fp32, dst),
        "int8-tensor": lambda dst: _dynamic(fp32, dst, False, None),
        "int8-channel": lambda dst: _dynamic(fp32, dst, True, tower),
        "int8-export": lambda dst: quantize_text(fp32, dst, texts, bundle.tokenizer(), work),
        "nbits8-b32": lambda dst: _nbits(fp32, dst),
    }
    out = {}
    for v in tqdm(variants, desc="text graph variants", unit="graph"):
        dst = fp32 if v == "fp32" else work / f"{v}.onnx"
        out[v] = (dst, make[v](dst))
    return out


def _latency(enc: TextEncoder, texts: list[str]) -> dict:
    for t in texts[:20]:
        enc([t])
    one = []
    for t in texts:
        t0 = time.perf_counter()
        enc([t])
        one.append(time.perf_counter() - t0)
    batched = []
    for s in range(0, len(texts) - 15, 16):
        t0 = time.perf_counter()
        enc(texts[s : s + 16])
        batched.append((time.perf_counter() - t0) / 16)
    return {
        "p50_ms": round(1000 * float(np.median(one)), 3),
        "p99_ms": round(1000 * float(np.percentile(one, 99)), 3),
        "batch16_ms_per_text": round(1000 * float(np.median(batched)), 3) if batched else None,
    }


def run(
    bundle: Bundle,
    g: EncodedGallery,
    work: Path,
    variants: tuple[str, ...] = VARIANTS,
    n: int = 300,
    teacher: Bundle | None = None,
) -> dict:
    """One row per variant, measured side by side in this process; the teacher's first."""
    # the products are ranked on the export's probe expressions (as `reir export cpu-text`
    # does), never on the texts they are scored on here
    probe = probe_set(work, 300) if not (work / "probe").exists() else load_dataset(work / "probe")
    graphs = build(bundle, variants, sensitivity_texts(probe), work / "graphs")
    if teacher is not None:
        fp32 = work / "graphs" / "teacher-fp32.onnx"
        fp32_text_graph(teacher, fp32)
        layers = _layers(teacher)
        graphs = {f"teacher fp32 ({layers} layers)": (fp32, {"bundle": str(teacher.path)})} | {
            (f"fp32 ({_layers(bundle)} layers)" if v == "fp32" else v): row for v, row in graphs.items()
        }
    gallery = build_gallery(g, len(g.image_ids), work / "gallery", bundle.query_sample())
    texts = g.texts[:n]
    rows, ref = [], None
    for v, (path, done) in graphs.items():
        queries = TextEncoder(path, bundle.tokenizer(), threads=2)(g.texts)
        ref = queries if ref is None else ref
        cos = (queries * ref).sum(1) / np.linalg.norm(queries, axis=1) / np.linalg.norm(ref, axis=1)
        row = {"variant": v, "what": done, "mb": round(path.stat().st_size / 1e6, 1)}
        row |= _latency(TextEncoder(path, bundle.tokenizer(), threads=1), texts)
        row |= {"cos_mean": round(float(cos.mean()), 5), "cos_min": round(float(cos.min()), 4)}
        row |= gallery_accuracy(g, gallery, queries)
        rows.append(row)
        print(json.dumps(row), flush=True)
    gallery.close()
    return {"images": len(g.image_ids), "queries": len(g.texts), "latency_texts": len(texts), "rows": rows}


def _layers(bundle: Bundle) -> int:
    return tower_depth(i.name for i in onnx.load(str(bundle.graph("text_encoder"))).graph.initializer)


def markdown(report: dict) -> str:
    rows = report["encoders"]["rows"]
    base = rows[0]
    lines = [
        f"# Query encoder variants: {report['machine_label']}",
        "",
        f"`{report['command']}`, {report['date']}. One expression on one thread (tokenizing included); "
        f"retrieval on the {report['encoders']['images']:,}-image test gallery, "
        f"{report['encoders']['queries']:,} expressions, through `Gallery.search`.",
        "",
        "| variant | MB | p50 ms | p99 ms | x row 1 | batch-16 ms/text | cos mean | cos min "
        "| BR@1 | mBR@1 | mBR@10 | REC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = {k: r[k] - base[k] for k in KEYS}
        lines.append(
            f"| {r['variant']} | {r['mb']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['p50_ms'] / base['p50_ms']:.2f} | {r['batch16_ms_per_text']} | {r['cos_mean']:.5f} | "
            f"{r['cos_min']:.4f} | " + " | ".join(f"{r[k]:.1f} ({d[k]:+.1f})" for k in KEYS) + " |"
        )
    kept = next((r["what"].get("kept_fp32") for r in rows if r["variant"] == "int8-export"), None)
    if kept:
        lines += ["", f"`int8-export` kept fp32: {', '.join(f'`{k}`' for k in kept)} (and the text head: {TEXT_HEAD})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reir.benchmarks.encoders", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--teacher", type=Path, default=None, help="a bundle whose fp32 text graph is the first row")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--work", type=Path, default=Path("/tmp/reir-bench-encoders"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args(argv)
    variants = tuple(v for v in a.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants or variants[0] != "fp32":
        raise SystemExit(f"--variants: fp32 first, then any of {VARIANTS} (got {a.variants!r})")
    b = Bundle.open(a.bundle or default_bundle())
    g = encoded_gallery(b, a.images, a.work)
    teacher = Bundle.open(a.teacher) if a.teacher else None
    if teacher is not None and teacher.model_id != b.model_id:
        raise SystemExit(f"--teacher {a.teacher}: another embedding space than {b.path} (model_id differs)")
    publish("encoders", run(b, g, a.work / "encoders", variants, teacher=teacher), markdown, a.out, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
