"""`reir export CHECKPOINT --out BUNDLE`: graphs, gates, tokenizer and manifest, atomically.

Everything is built in a temporary directory beside BUNDLE and renamed into place only
after every gate passed, so a directory at BUNDLE is always a complete, gated bundle.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from reir.datasets.synth import SynthConfig, generate, vocabulary
from reir.engine.fsutil import atomic_directory
from reir.engine.runtime.bundle import FORMAT, VERSION, Bundle, sha256_file
from reir.engine.runtime.encoders import TextEncoder, VisualEncoder
from reir.training.checkpoint import load_model
from reir.training.config import EvalConfig
from reir.training.evaluate import torch_detector, torch_text_encoder
from reir.training.text_branch import load_tokenizer

from . import gates as G
from .graphs import OPSET, export_text, export_visual, optimize
from .precision import to_fp16, to_int8, to_w16
from .query_sample import expressions, write_query_sample
from .ties import proposal_alternatives, routing_alternatives
from .vocab import kept_ids, trim_embedding, trim_tokenizer

PRECISIONS = ("fp32", "fp16", "w16", "int8")


def export_bundle(
    checkpoint: Path,
    out: Path,
    precision: str = "fp32",
    static_shape: tuple[int, int] | None = None,
    max_batch: int = 32,
    topk: int = 30,
    nms_iou: float = 0.7,
    probe_images: int = 300,
    overwrite: bool = False,
    optimized_copy: bool = True,
    vocab: int | None = None,
    log=print,
) -> dict[str, Any]:
    """`vocab`: trim the text vocabulary to its `vocab` most frequent tokens plus every token of
    the synthetic grammar (export/vocab.py); gated like a reduced precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint = Path(checkpoint)
    cfg, model = load_model(checkpoint)
    hw = static_shape or (cfg.model.image_size, cfg.model.image_size)
    static_batch = max_batch if static_shape else None
    max_length = cfg.model.text.max_length
    hf_tok = load_tokenizer(cfg.model.text)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        t0 = time.perf_counter()
        log(f"exporting ONNX graphs (opset {OPSET}, input {hw[0]}x{hw[1]}, top-{topk}, NMS {nms_iou})")
        export_text(model, work / "text_fp32.onnx", static_batch, max_length)
        export_visual(model, work / "visual_fp32.onnx", hw, topk, nms_iou, static_batch)
        text = _write_tokenizer(hf_tok, tmp, max_length, pad_to_max=bool(static_batch) or model.text.siglip)
        log(f"probe set: {probe_images} synthetic gallery images (seed {G.PROBE_SEED})")
        ds = G.probe_set(work, probe_images)

        def ort_fns(text_graph: Path, visual_graph: Path, tokenizer_root: Path = tmp):
            tok = Bundle(tokenizer_root, {"text": text}).tokenizer()
            return VisualEncoder(visual_graph), TextEncoder(text_graph, tok)

        ecfg = EvalConfig(topk=topk, nms_iou=nms_iou)
        ref = (torch_detector(model, ecfg), torch_text_encoder(model, hf_tok))
        ties = (routing_alternatives(model, ref[1]), proposal_alternatives(model, ecfg))
        shutil.copyfile(tmp / "tokenizer.json", work / "tokenizer.json")
        fp32 = ort_fns(work / "text_fp32.onnx", work / "visual_fp32.onnx", work)
        log("gate: fp32 ONNX vs PyTorch")
        ref_metrics, fp32_metrics = G.retrieval(ref, ds, hw), G.retrieval(fp32, ds, hw)
        parity = {"fp32_vs_pytorch": G.parity(ref, fp32, ds, hw)}
        gates = G.gate_fp32(parity["fp32_vs_pytorch"], ref_metrics, fp32_metrics)
        log(G.format_gates(gates))
        if not all(g.passed for g in gates):
            raise G.GateError("fp32 ONNX", gates)
        text_graph, visual_graph, metrics = work / "text_fp32.onnx", work / "visual_fp32.onnx", fp32_metrics
        graph_precision = {"text_encoder": "fp32", "visual_encoder": "fp32"}
        notes: list[str] = []
        if vocab:
            text["vocabulary"] = _trim_vocabulary(tmp, work, vocab, log)
            notes.append(text["vocabulary"]["note"])
        if precision != "fp32" or vocab:
            text_graph, visual_graph = _convert(precision, work)
            graph_precision = {
                "text_encoder": precision,
                "visual_encoder": "fp32" if precision == "int8" else precision,
            }
            while True:
                cand = ort_fns(text_graph, visual_graph)
                log(f"gate: {precision}{' + trimmed vocabulary' if vocab else ''} vs fp32 ONNX")
                metrics = G.retrieval(cand, ds, hw)
                label = f"{precision}{'_vocab' if vocab else ''}_vs_fp32"
                parity[label] = G.parity(fp32, cand, ds, hw, *ties)
                reduced = G.gate_reduced(precision, parity[label], fp32_metrics, metrics)
                log(G.format_gates(reduced))
                if ties[0]:
                    flips = parity[label]["query_routing_flips"]
                    log(f"  text queries that took another MORE routing at a tie: {flips:.1%}")
                flips = parity[label]["instance_proposal_flips"]
                log(f"  instances that took another proposal ranking at a tie: {flips:.1%}")
                text_only = [g for g in reduced if not g.passed] == [reduced[0]]
                if precision == "fp16" and text_only and graph_precision["text_encoder"] == "fp16":
                    # MORE routes each query to its top-2 experts: near a tie, fp16 noise in the
                    # encoder flips the choice. The text encoder runs once per query, so keep it
                    # fp32 and the (costly, per gallery image) visual graph fp16.
                    log("text encoder: fp16 failed its gate; keeping it fp32 in this bundle")
                    text_graph, graph_precision["text_encoder"] = work / "text_fp32.onnx.in", "fp32"
                    notes.append(f"fp16 text encoder refused (query min cosine {reduced[0].value:.4f}); kept fp32")
                    continue
                break
            if not all(g.passed for g in reduced):
                raise G.GateError(f"{precision}{' + trimmed vocabulary' if vocab else ''} ONNX", reduced)
            gates += reduced
        graphs = {}
        for name, src in (("text_encoder", text_graph), ("visual_encoder", visual_graph)):
            shutil.copyfile(src, tmp / f"{name}.onnx")
            graphs[name] = {"file": f"{name}.onnx", "optimized": None}
            if optimized_copy and precision != "w16":  # the optimised copy folds the fp16 weights back to fp32
                optimize(tmp / f"{name}.onnx", tmp / f"{name}.optimized.onnx")
                graphs[name]["optimized"] = f"{name}.optimized.onnx"

        latency = _latency(tmp, graphs, text, ds, hw)
        shutil.rmtree(work)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "precision": precision,
            "graph_precision": graph_precision,
            "opset": OPSET,
            "embedding_dim": model.embed_dim,
            "score": "dot product of query and instance embedding (raw, not normalised)",
            "topk": topk,
            "nms_iou": nms_iou,
            "static": static_batch is not None,
            "max_batch": max_batch,
            "image": {
                "height": hw[0],
                "width": hw[1],
                "layout": "NHWC",
                "dtype": "uint8",
                "channels": "RGB",
                "resize": "client side: Pillow bilinear to height x width, no letterbox (reir.engine.runtime.image)",
                "normalisation": "inside the graph: x / 255",
                "boxes": "xyxy in input pixels; scale by original / input size",
            },
            "text": text,
            "graphs": graphs,
            "source": {
                "checkpoint": checkpoint.name,
                "sha256": sha256_file(checkpoint),
                "config": cfg.to_dict(),
            },
            "probe": {
                "images": probe_images,
                "seed": G.PROBE_SEED,
                "pytorch": ref_metrics,
                "onnx": metrics,
                "gates": G.as_records(gates),
                "parity": parity,
                "notes": notes,
                "cpu_latency_ms": latency,
            },
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        manifest["files"] = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file() and p.name != "manifest.json"
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        texts, source = _training_expressions(cfg, work_root=out.parent)
        manifest["query_sample"] = write_query_sample(tmp, texts, source)
        log(f"query sample: {manifest['query_sample']['count']} vectors ({source})")
    log(f"bundle written: {out} ({precision}, {manifest['export_seconds']} s)")
    return manifest


def _training_expressions(cfg, work_root: Path) -> tuple[list[str], str]:
    """Expressions like the model's training ones: its dataset's train split where it is on
    disk, else (a synthetic recipe) the same generator's train scenes, regenerated."""

    root = Path(cfg.data.root)
    if (root / "refs.json").is_file():
        try:
            return expressions(root, cfg.data.train_split), f"{cfg.data.train_split} expressions of {root.name}"
        except ValueError:
            pass
    with tempfile.TemporaryDirectory(dir=work_root) as tmp:
        synth = SynthConfig(images=2400, seed=cfg.data.generate_seed, fractions=(1, 0, 0), answers="none")
        generate(Path(tmp) / "d", synth, progress=False)
        texts = expressions(Path(tmp) / "d", "train")
    return texts, f"train expressions of the synthetic generator (seed {cfg.data.generate_seed})"


def _convert(precision: str, work: Path) -> tuple[Path, Path]:
    """The candidate graphs; the text graph starts from `text_fp32.onnx.in` (trimmed or not)."""
    text_in, visual_in = work / "text_fp32.onnx.in", work / "visual_fp32.onnx"
    if not text_in.exists():
        shutil.copyfile(work / "text_fp32.onnx", text_in)
    convert = {"fp32": None, "fp16": to_fp16, "w16": to_w16, "int8": to_int8}[precision]
    if convert is None:
        return text_in, visual_in
    convert(text_in, work / f"text_{precision}.onnx")
    if precision == "int8":  # quantised convolutions have no ORT CPU kernel
        return work / "text_int8.onnx", visual_in
    convert(visual_in, work / f"visual_{precision}.onnx")
    return work / f"text_{precision}.onnx", work / f"visual_{precision}.onnx"


def _trim_vocabulary(tmp: Path, work: Path, keep_first: int, log) -> dict[str, Any]:
    """Trim tokenizer.json in the bundle and write work/text_fp32.onnx.in with the kept rows."""
    full = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    size = len(full["model"]["vocab"])
    ids = kept_ids(full, keep_first, sorted(vocabulary()))
    saved = trim_embedding(work / "text_fp32.onnx", work / "text_fp32.onnx.in", ids, size)
    (tmp / "tokenizer.json").write_text(json.dumps(trim_tokenizer(full, ids)), encoding="utf-8")
    note = (
        f"text vocabulary trimmed to {len(ids)} of {size} WordPiece tokens (the {keep_first} most frequent, "
        f"every character piece, every word of the synthetic grammar): {saved / 1e6:.1f} MB less in fp32; "
        "rarer words tokenize into kept pieces"
    )
    log(note)
    return {"kept": len(ids), "of": size, "keep_first": keep_first, "note": note}


def _write_tokenizer(hf_tok, out: Path, max_length: int, pad_to_max: bool) -> dict[str, Any]:
    """tokenizer.json for the `tokenizers` package, and what the runtime needs to use it."""
    saved = out / ".work" / "tokenizer"
    hf_tok.save_pretrained(str(saved))
    if not (saved / "tokenizer.json").is_file():
        raise RuntimeError("the text encoder's tokenizer has no fast (tokenizer.json) form; it cannot be exported")
    shutil.copyfile(saved / "tokenizer.json", out / "tokenizer.json")
    return {
        "tokenizer": "tokenizer.json",
        "max_length": max_length,
        "pad_id": int(hf_tok.pad_token_id),
        "pad_token": str(hf_tok.pad_token),
        "pad_to_max": pad_to_max,
        "cleaning": "reir.engine.runtime.expressions.clean_expression (lower case, punctuation removed)",
    }


def _latency(root: Path, graphs: dict, text: dict, ds, hw) -> dict[str, float]:
    """Median CPU latency of each graph at batch 1 (the export machine; for orientation)."""
    b = Bundle(root, {"text": text, "graphs": graphs})
    te, ve = b.text_encoder(threads=0), b.visual_encoder(threads=0)
    img = np.zeros((1, *hw, 3), np.uint8)
    expr = next(iter(ds.expressions.values())).text
    out = {}
    for name, fn, arg in (("text_batch1", te, [expr]), ("visual_batch1", ve, img)):
        fn(arg)
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - t)
        out[name] = round(1000 * float(np.median(times)), 3)
    return out


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "reir": _reir_version(),
    }


def _reir_version() -> str:
    try:
        return version("clare-reir")
    except PackageNotFoundError:
        return "unknown"
