"""`reir export bundle CHECKPOINT --out BUNDLE`: graphs, gates, tokenizer and manifest, atomically.

Everything is built in a temporary directory beside BUNDLE and renamed into place only
after every gate passed, so a directory at BUNDLE is always a complete, gated bundle.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
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
from .cpu_text import quantize_text, sensitivity_texts
from .graphs import OPSET, export_text, export_visual, optimize
from .precision import to_fp16, to_w16
from .query_sample import expressions, write_query_sample
from .ties import proposal_alternatives, routing_alternatives
from .vocab import kept_ids, trim_embedding, trim_tokenizer

PRECISIONS = ("fp32", "fp16", "w16", "int8")


@dataclass
class _Probe:
    """The probe set every gate measures on, and the models compared there."""

    ds: Any
    hw: tuple[int, int]
    ref: tuple  # PyTorch (detector, text encoder)
    fp32: tuple  # the fp32 ONNX graphs in ONNX Runtime
    ties: tuple  # where the model's own choices tie (MORE routing, proposal ranks)
    text: dict[str, Any]  # the bundle's tokenizer entry
    int8: dict[str, Any] = field(default_factory=dict)  # what the int8 text graph quantised and kept

    def encoders(self, text_graph: Path, visual_graph: Path, tokenizer_root: Path):
        tok = Bundle(tokenizer_root, {"text": self.text}).tokenizer()
        return VisualEncoder(visual_graph), TextEncoder(text_graph, tok)


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
    """Export, gate fp32 against PyTorch, reduce (precision, vocabulary) and gate that against
    fp32, then write graphs, manifest and query sample. `vocab`: trim the text vocabulary to
    its `vocab` most frequent tokens plus every token of the synthetic grammar (export/vocab.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    checkpoint = Path(checkpoint)
    cfg, model = load_model(checkpoint)
    hw = static_shape or (cfg.model.image_size, cfg.model.image_size)
    static_batch = max_batch if static_shape else None
    with atomic_directory(out, overwrite=overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        t0 = time.perf_counter()
        probe = _export_and_probe(model, cfg, tmp, work, hw, topk, nms_iou, static_batch, probe_images, log)
        ref_metrics, metrics, parity, gates = _gate_fp32(probe, log)
        graph_precision = {"text_encoder": "fp32", "visual_encoder": "fp32"}
        text_graph, visual_graph, notes = work / "text_fp32.onnx", work / "visual_fp32.onnx", []
        if vocab:
            probe.text["vocabulary"] = _trim_vocabulary(tmp, work, vocab, log)
            notes.append(probe.text["vocabulary"]["note"])
        if precision != "fp32" or vocab:
            text_graph, visual_graph, graph_precision, metrics = _reduce(
                probe, precision, bool(vocab), tmp, work, metrics, parity, gates, notes, log
            )
        graphs = _install_graphs(tmp, text_graph, visual_graph, optimized_copy and precision != "w16")
        latency = _latency(tmp, graphs, probe.text, probe.ds, hw)
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
            "image": _image_contract(hw),
            "text": probe.text,
            "graphs": graphs,
            "source": {"checkpoint": checkpoint.name, "sha256": sha256_file(checkpoint), "config": cfg.to_dict()},
            "probe": {
                "images": probe_images,
                "seed": G.PROBE_SEED,
                "pytorch": ref_metrics,
                "onnx": metrics,
                "gates": G.as_records(gates),
                "parity": parity,
                "notes": notes,
                "cpu_latency_ms": latency,
                **({"int8": probe.int8} if probe.int8 else {}),
            },
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        _seal(tmp, manifest, cfg, out, log)
    log(f"bundle written: {out} ({precision}, {manifest['export_seconds']} s)")
    return manifest


def _export_and_probe(model, cfg, tmp: Path, work: Path, hw, topk, nms_iou, static_batch, probe_images, log) -> _Probe:
    """The fp32 graphs and the tokenizer, written; the probe set, generated."""
    max_length = cfg.model.text.max_length
    hf_tok = load_tokenizer(cfg.model.text)
    log(f"exporting ONNX graphs (opset {OPSET}, input {hw[0]}x{hw[1]}, top-{topk}, NMS {nms_iou})")
    export_text(model, work / "text_fp32.onnx", static_batch, max_length)
    export_visual(model, work / "visual_fp32.onnx", hw, topk, nms_iou, static_batch)
    text = _write_tokenizer(hf_tok, tmp, max_length, pad_to_max=bool(static_batch) or model.text.siglip)
    shutil.copyfile(tmp / "tokenizer.json", work / "tokenizer.json")
    log(f"probe set: {probe_images} synthetic gallery images (seed {G.PROBE_SEED})")
    ds = G.probe_set(work, probe_images)
    ecfg = EvalConfig(topk=topk, nms_iou=nms_iou)
    ref = (torch_detector(model, ecfg), torch_text_encoder(model, hf_tok))
    ties = (routing_alternatives(model, ref[1]), proposal_alternatives(model, ecfg))
    probe = _Probe(ds, hw, ref, (), ties, text)
    probe.fp32 = probe.encoders(work / "text_fp32.onnx", work / "visual_fp32.onnx", work)
    return probe


def _gate_fp32(probe: _Probe, log) -> tuple[dict, dict, dict, list]:
    """fp32 ONNX against PyTorch: (PyTorch metrics, fp32 metrics, parity, gates); GateError if it fails."""
    log("gate: fp32 ONNX vs PyTorch")
    ref_metrics = G.retrieval(probe.ref, probe.ds, probe.hw)
    fp32_metrics = G.retrieval(probe.fp32, probe.ds, probe.hw)
    parity = {"fp32_vs_pytorch": G.parity(probe.ref, probe.fp32, probe.ds, probe.hw)}
    gates = G.gate_fp32(parity["fp32_vs_pytorch"], ref_metrics, fp32_metrics)
    log(G.format_gates(gates))
    if not all(g.passed for g in gates):
        raise G.GateError("fp32 ONNX", gates)
    return ref_metrics, fp32_metrics, parity, gates


def _reduce(probe: _Probe, precision: str, vocab: bool, tmp: Path, work: Path, fp32_metrics, parity, gates, notes, log):
    """The reduced graphs, gated against fp32 ONNX (extends `parity`, `gates`, `notes`):
    (text graph, visual graph, precision per graph, their metrics). An fp16 text encoder that
    fails its gate alone is kept fp32 (MORE's top-2 routing flips near ties under fp16 noise;
    the text encoder runs once per query, the costly visual graph once per gallery image)."""
    text_graph, visual_graph = _convert(precision, work, probe, tmp)
    graph_precision = {"text_encoder": precision, "visual_encoder": "fp32" if precision == "int8" else precision}
    what = f"{precision}{' + trimmed vocabulary' if vocab else ''}"
    label = f"{precision}{'_vocab' if vocab else ''}_vs_fp32"
    while True:
        cand = probe.encoders(text_graph, visual_graph, tmp)
        log(f"gate: {what} vs fp32 ONNX")
        metrics = G.retrieval(cand, probe.ds, probe.hw)
        parity[label] = G.parity(probe.fp32, cand, probe.ds, probe.hw, *probe.ties)
        reduced = G.gate_reduced(precision, parity[label], fp32_metrics, metrics)
        log(G.format_gates(reduced))
        if probe.ties[0]:
            log(f"  text queries that took another MORE routing at a tie: {parity[label]['query_routing_flips']:.1%}")
        log(f"  instances that took another proposal ranking at a tie: {parity[label]['instance_proposal_flips']:.1%}")
        text_only = [g for g in reduced if not g.passed] == [reduced[0]]
        if precision == "fp16" and text_only and graph_precision["text_encoder"] == "fp16":
            log("text encoder: fp16 failed its gate; keeping it fp32 in this bundle")
            text_graph, graph_precision["text_encoder"] = work / "text_fp32.onnx.in", "fp32"
            notes.append(f"fp16 text encoder refused (query min cosine {reduced[0].value:.4f}); kept fp32")
            continue
        break
    if not all(g.passed for g in reduced):
        raise G.GateError(f"{what} ONNX", reduced)
    gates += reduced
    return text_graph, visual_graph, graph_precision, metrics


def _install_graphs(tmp: Path, text_graph: Path, visual_graph: Path, optimized_copy: bool) -> dict[str, Any]:
    """The graphs into the bundle, with ONNX Runtime's optimised copies where asked (not for
    w16: the optimised copy folds the fp16 weights back to fp32)."""
    graphs = {}
    for name, src in (("text_encoder", text_graph), ("visual_encoder", visual_graph)):
        shutil.copyfile(src, tmp / f"{name}.onnx")
        graphs[name] = {"file": f"{name}.onnx", "optimized": None}
        if optimized_copy:
            optimize(tmp / f"{name}.onnx", tmp / f"{name}.optimized.onnx")
            graphs[name]["optimized"] = f"{name}.optimized.onnx"
    return graphs


def _image_contract(hw: tuple[int, int]) -> dict[str, Any]:
    return {
        "height": hw[0],
        "width": hw[1],
        "layout": "NHWC",
        "dtype": "uint8",
        "channels": "RGB",
        "resize": "client side: Pillow bilinear to height x width, no letterbox (reir.engine.runtime.image)",
        "normalisation": "inside the graph: x / 255",
        "boxes": "xyxy in input pixels; scale by original / input size",
    }


def _seal(tmp: Path, manifest: dict[str, Any], cfg, out: Path, log) -> None:
    """Checksums of every file, the manifest, then the query sample (which adds itself)."""
    manifest["files"] = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(tmp.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    texts, source = _training_expressions(cfg, work_root=out.parent)
    manifest["query_sample"] = write_query_sample(tmp, texts, source)
    log(f"query sample: {manifest['query_sample']['count']} vectors ({source})")


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


def _convert(precision: str, work: Path, probe: _Probe, tmp: Path) -> tuple[Path, Path]:
    """The candidate graphs; the text graph starts from `text_fp32.onnx.in` (trimmed or not)."""
    text_in, visual_in = work / "text_fp32.onnx.in", work / "visual_fp32.onnx"
    if not text_in.exists():
        shutil.copyfile(work / "text_fp32.onnx", text_in)
    if precision == "fp32":
        return text_in, visual_in
    if precision == "int8":  # quantised convolutions have no ORT CPU kernel: only the text graph
        tokenizer = Bundle(tmp, {"text": probe.text}).tokenizer()  # the trimmed one, if trimmed
        probe.int8 = quantize_text(text_in, work / "text_int8.onnx", sensitivity_texts(probe.ds), tokenizer, work)
        return work / "text_int8.onnx", visual_in
    convert = {"fp16": to_fp16, "w16": to_w16}[precision]
    convert(text_in, work / f"text_{precision}.onnx")
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
