"""`reir export cpu-text BUNDLE`: an int8 text encoder for CPU hosts, added to a bundle.

Why: on a CPU server the text encoder is most of a query's cost (about 5 ms of fp32 on one
thread for the synth model's MiniLM tower, against 1-2 ms of search below a million
instances). Its int8 form (export/precision.py `to_int8`) costs less: 0.76x the fp32 time
with the export's recipe on the synth model, 0.52x with every product int8, which fails
the gate there (benchmarks/encoders.py). It is a CPU format only: GPUs and Jetson keep
the bundle's portable graph (fp16, TensorRT), so the bundle carries both and
`Bundle.text_encoder()` takes the int8 one on CPU (`graphs.text_encoder.optimized`;
`optimized=False` asks for the portable one).

It is derived from the bundle's own text graph, not from a checkpoint, so it also applies
to a shipped bundle; its gates compare it with that graph in ONNX Runtime, on the export's
probe set, with the int8 limits (export/gates.py `gate_reduced`). A query that took another
MORE routing where the reference ties is compared with the reference under that routing, as
the export's gates do, with the ties found in the graph itself (export/routing_ties.py). A
failed gate leaves the bundle as it was.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from reir.engine.fsutil import atomic_file, write_json_atomic
from reir.engine.runtime.bundle import Bundle, sha256_file
from reir.engine.runtime.encoders import TextEncoder

from . import gates as G
from .precision import KEEP_SHARE, from_w16, int8_sensitivity, to_int8
from .routing_ties import routing_alternatives

FILE = "text_encoder.cpu.onnx"
SENSITIVITY_TEXTS = 128  # the probe set's last test expressions (the parity gate uses its first)


def sensitivity_texts(probe) -> list[str]:
    """The probe set's expressions the products are ranked on (never the parity gate's)."""
    return [e.text for e in sorted(probe.split_expressions("test"), key=lambda e: e.id)][-SENSITIVITY_TEXTS:]


def fp32_text_graph(bundle: Bundle, dst: Path) -> str:
    """Write the fp32 graph the bundle's text encoder computes (w16 weights folded back, or
    the fp32 graph itself) to `dst`; the portable graph's precision."""
    portable = bundle.manifest["graph_precision"]["text_encoder"]
    if portable not in ("fp32", "w16"):
        raise ValueError(f"{bundle.path}: its text encoder is {portable}; the fp32 graph is derived from fp32 or w16")
    (from_w16 if portable == "w16" else shutil.copyfile)(bundle.graph("text_encoder"), dst)
    return portable


def quantize_text(
    fp32: Path, dst: Path, texts: list[str], tokenizer, work: Path, keep: int | None = None
) -> dict[str, Any]:
    """The int8 text graph of an fp32 one: the `keep` products most sensitive on `texts` stay
    fp32 (None: `KEEP_SHARE` of them)."""
    feeds = []
    for s in range(0, len(texts), 16):
        ids, mask, _ = tokenizer(texts[s : s + 16])
        feeds.append({"input_ids": ids, "attention_mask": mask})
    ranked = int8_sensitivity(fp32, feeds, work)
    keep = round(KEEP_SHARE * len(ranked)) if keep is None else keep
    done = to_int8(fp32, dst, keep=tuple(name for name, _ in ranked[:keep]))
    done["sensitivity"] = {name: round(loss, 7) for name, loss in ranked[:keep]}
    return done


def add_cpu_text(path: Path, probe_images: int = 300, keep: int | None = None, log=print) -> dict[str, Any]:
    """Gate and add the int8 CPU text graph to the bundle at `path`; its manifest entry."""
    bundle = Bundle.open(path)
    m = bundle.manifest
    with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".cpu-text-") as tmp:
        work = Path(tmp)
        fp32 = work / "text_fp32.onnx"
        portable = fp32_text_graph(bundle, fp32)
        log(f"probe set: {probe_images} synthetic gallery images (seed {G.PROBE_SEED})")
        ds = G.probe_set(work, probe_images)
        texts = sensitivity_texts(ds)
        log(f"int8 sensitivity of each tower product on {len(texts)} probe expressions")
        done = quantize_text(fp32, work / FILE, texts, bundle.tokenizer(), work, keep)
        visual = bundle.visual_encoder(optimized=False)
        ref = (visual, bundle.text_encoder(optimized=False))
        cand = (visual, TextEncoder(work / FILE, bundle.tokenizer()))
        log(f"gate: int8 CPU text encoder vs the bundle's {portable} one")
        ref_metrics, metrics = G.retrieval(ref, ds, bundle.input_hw), G.retrieval(cand, ds, bundle.input_hw)
        ties = routing_alternatives(fp32, bundle.tokenizer())
        parity = G.parity(ref, cand, ds, bundle.input_hw, ties)
        found = G.gate_reduced("int8", parity, ref_metrics, metrics)
        log(G.format_gates(found))
        if not all(g.passed for g in found):
            raise G.GateError("the int8 CPU text encoder", found)
        with atomic_file(Path(path) / FILE) as out:
            shutil.copyfile(work / FILE, out)
    entry = {
        "precision": "int8",
        "from": portable,
        **done,
        "probe": {"images": probe_images, "seed": G.PROBE_SEED, "onnx": metrics, "reference": ref_metrics},
        "parity": parity,
        "gates": G.as_records(found),
    }
    m["graphs"]["text_encoder"]["optimized"] = FILE
    m["graphs"]["text_encoder"]["cpu"] = entry
    m["files"][FILE] = {"sha256": sha256_file(Path(path) / FILE), "bytes": (Path(path) / FILE).stat().st_size}
    write_json_atomic(Path(path) / "manifest.json", m)  # last: until here the bundle is the old one
    Bundle.open(path)  # every checksum, the new file's included
    log(f"{path}: {FILE} ({entry['int8']} int8 products, {len(entry['kept_fp32'])} kept fp32)")
    return entry
