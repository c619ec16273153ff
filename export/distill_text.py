"""`reir export distill-text BUNDLE --out DIR`: a shallower text tower, taught by the bundle's own.

Why: on a CPU host the query encoder was most of a query's cost (the synth model's six-layer
MiniLM tower: about 4-6 ms of fp32 on one thread, against 1-2 ms of search below a million
instances), and int8 does not halve it without failing the gates (export/cpu_text.py). A
student with two of the teacher's layers, trained to give the teacher's query vectors,
costs 0.3x (benchmarks/encoders.py). It is the same embedding space: the visual graph is the
teacher's, byte for byte, so galleries indexed with the teacher keep working (the bundle's
`model_id` is unchanged) and no image is re-encoded.

How:
- teacher: the bundle's text side rebuilt in PyTorch from its graph (export/text_from_graph.py);
- student: a copy keeping `layers` of the tower and all of the head. A layer the teacher kept
  frozen in training (the pretrained lower layers) stays frozen; the word embeddings train,
  but only the rows of words the texts contain move;
- loss: squared error to the teacher's query relative to its norm (the score is a raw dot
  product, so length matters as much as direction);
- texts: a dataset's train expressions (`--data`), by default the synthetic grammar's train
  split under its own seed, never the probe set's or the benchmarks' galleries;
- gates, on the probe set with the bundle's own visual graph: the student's graph against
  its PyTorch module (fp32 rule), its w16 form against its fp32 form (w16 rule), and its
  retrieval against the teacher's: BR@1, mBR@1, mBR@10 and REC each within 0.5 point, mean query
  cosine >= 0.98. A failed gate writes nothing.
"""

from __future__ import annotations

import copy
import math
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from reir.datasets.synth.generate import SynthConfig, generate
from reir.engine.fsutil import write_json_atomic
from reir.engine.runtime.bundle import Bundle, sha256_file
from reir.engine.runtime.encoders import TextEncoder
from reir.training.model import CLARE
from reir.training.text_branch import encode_by_length

from . import gates as G
from .cpu_text import FILE as CPU_FILE
from .graphs import export_text
from .precision import to_w16
from .query_sample import SAMPLE, expressions, write_query_sample
from .text_from_graph import text_model

LAYERS = (0, 5)  # the teacher's first (pretrained, frozen in training) and last (trained)
STEPS, TEXTS, BATCH, LR, WARMUP = 2500, 40_000, 128, 3e-4, 100
HELD = 2000  # texts held out of training: the progress line's cosine
TEXT_SEED = 1234  # the grammar's train split under a seed of its own
ACCURACY_LIMIT, COSINE_LIMIT = 0.5, 0.98
GATED = ("BR@1(0.5)", "mBR@1(0.5)", "mBR@10(0.5)", "REC@0.5")  # the others are recorded
DISTILL_PROBE_IMAGES = 1000  # a 0.5-point gate needs more probe queries than cpu-text's 300


def grammar_texts(work: Path, n: int, seed: int = TEXT_SEED) -> list[str]:
    """`n` distinct train-split expressions of the synthetic grammar."""
    root = work / "texts"
    generate(
        root,
        SynthConfig(images=max(100, n // 3), seed=seed, fractions=(1, 0, 0), exprs_per_image=6, answers="none"),
        progress=False,
    )
    return expressions(root, "train", n, seed)


def student_of(teacher: CLARE, layers: tuple[int, ...]) -> CLARE:
    """The teacher with only `layers` of its text tower and the head of its last decoder layer;
    a layer the teacher had frozen stays frozen, the word embeddings train."""
    tower = teacher.text.model.encoder.layer
    if not layers or sorted(set(layers)) != list(layers) or layers[-1] >= len(tower):
        raise ValueError(f"layers: increasing indices into the teacher's {len(tower)} text layers (got {layers})")
    student = copy.deepcopy(teacher)  # requires_grad as the teacher's recipe left it (TextBranch.freeze)
    kept = [student.text.model.encoder.layer[i] for i in layers]
    trained = [any(p.requires_grad for p in layer.parameters()) for layer in kept]
    embeddings = [p.requires_grad for p in student.text.model.embeddings.parameters()]
    student.text.model.encoder.layer = torch.nn.ModuleList(kept)
    student.text.model.config.num_hidden_layers = len(layers)
    student.requires_grad_(False)
    for layer, on in zip(kept, trained, strict=True):
        layer.requires_grad_(on)
    for p, on in zip(student.text.model.embeddings.parameters(), embeddings, strict=True):
        p.requires_grad_(on)
    # The word embeddings train even where the teacher froze them: two layers must do the work
    # of six, and their inputs may move. A word absent from the distillation texts gets no
    # gradient and, with no weight decay, keeps its row.
    student.text.model.embeddings.word_embeddings.requires_grad_(True)
    last = len(student.text_proj) - 1  # the inference query is the last decoder layer's
    for module in (student.text_pools, student.relation_query, student.text_proj[last], student.relation_slots[last]):
        module.requires_grad_(True)
    return student


def relative_error(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (((q - t) ** 2).sum(1) / (t**2).sum(1)).mean()


def distill(
    teacher: CLARE, student: CLARE, ids: torch.Tensor, mask: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> dict[str, Any]:
    """Train `student` to give `teacher`'s queries on the texts (`ids`, `mask`); the first
    `HELD` texts are held out and measured before and after."""
    t0 = time.time()
    with torch.no_grad():
        target = torch.cat(
            [
                encode_by_length(teacher.encode_text, ids[s : s + 4096], mask[s : s + 4096], 256)
                for s in range(0, len(ids), 4096)
            ]
        )
    held = min(HELD, len(ids) // 5)

    def measure() -> dict[str, float]:
        student.eval()
        with torch.no_grad():
            q = encode_by_length(student.encode_text, ids[:held], mask[:held], 256)
        cos = torch.nn.functional.cosine_similarity(q, target[:held])
        return {
            "error": float(relative_error(q, target[:held])),
            "cos_mean": float(cos.mean()),
            "cos_min": float(cos.min()),
        }

    before = measure()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    rng = np.random.default_rng(seed)
    student.train()
    bar = tqdm(range(steps), desc="distilling the text tower", unit="step")
    for step in bar:
        idx = torch.from_numpy(rng.choice(np.arange(held, len(ids)), batch, replace=False))
        m = mask[idx]
        width = int(m.sum(1).max())
        loss = relative_error(student.encode_text(ids[idx, :width], m[:, :width]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(error=f"{loss.item():.4f}")
    student.eval()
    after = measure()
    return {
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "texts": len(ids),
        "held_out": held,
        "before": {k: round(v, 5) for k, v in before.items()},
        "after": {k: round(v, 5) for k, v in after.items()},
        "trainable_parameters": sum(p.numel() for p in params),
        "seconds": round(time.time() - t0, 1),
    }


def distill_bundle(
    src: Path,
    out: Path,
    layers: tuple[int, ...] = LAYERS,
    steps: int = STEPS,
    texts: int = TEXTS,
    data: Path | None = None,
    probe_images: int = DISTILL_PROBE_IMAGES,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Write the bundle with the distilled text tower to `out` (which must not exist); its
    manifest's `text.distilled` entry. A failed gate raises `GateError` and writes nothing."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists (distill-text writes a new bundle)")
    bundle = Bundle.open(src)
    torch.manual_seed(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".distill-text-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        new = Path(tmp) / "bundle"
        shutil.copytree(bundle.path, new)
        teacher = text_model(bundle)
        student = student_of(teacher, tuple(layers))
        corpus = expressions(data, "train", texts, seed) if data else grammar_texts(work, texts)
        source = (
            f"{len(corpus)} train expressions of {data.name if data else f'the synthetic grammar (seed {TEXT_SEED})'}"
        )
        log(f"distilling {len(teacher.text.model.encoder.layer)} text layers into {list(layers)} on {source}")
        tok = bundle.tokenizer()
        ids, mask, _ = tok(corpus)
        done = distill(
            teacher, student, torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), steps, BATCH, LR, seed
        )
        before, after = done["before"], done["after"]
        log(f"held-out error {before['error']:.4f} -> {after['error']:.4f}, mean cosine {after['cos_mean']:.4f}")

        fp32 = work / "student_fp32.onnx"
        export_text(student, fp32)
        portable = bundle.manifest["graph_precision"]["text_encoder"]
        graph = new / bundle.manifest["graphs"]["text_encoder"]["file"]
        (to_w16 if portable == "w16" else shutil.copyfile)(fp32, graph)

        log(f"probe set: {probe_images} synthetic gallery images (seed {G.PROBE_SEED})")
        ds = G.probe_set(work, probe_images)
        visual = bundle.visual_encoder(optimized=False)
        teacher_fns = (visual, bundle.text_encoder(optimized=False))
        student_fns = (visual, TextEncoder(graph, tok))
        found = _gates(student, fp32, graph, portable, teacher_fns, student_fns, ds, bundle, tok)
        log(G.format_gates(found["gates"]))
        if not all(g.passed for g in found["gates"]):
            raise G.GateError("the distilled text encoder", found["gates"])

        m = copy.deepcopy(bundle.manifest)
        m["created"] = datetime.now(UTC).isoformat(timespec="seconds")
        m["graphs"]["text_encoder"] = {
            "file": graph.name,
            "optimized": None,
        }  # a teacher's int8 graph no longer applies
        (new / CPU_FILE).unlink(missing_ok=True)
        m["files"].pop(CPU_FILE, None)
        m["text"]["distilled"] = {
            "teacher": {
                "text_encoder_sha256": bundle.manifest["files"][bundle.manifest["graphs"]["text_encoder"]["file"]][
                    "sha256"
                ],
                "layers": len(teacher.text.model.encoder.layer),
            },
            "layers": list(layers),
            "corpus": source,
            **done,
            "probe": {
                "images": probe_images,
                "seed": G.PROBE_SEED,
                "teacher": found["teacher"],
                "student": found["student"],
            },
            "gates": G.as_records(found["gates"]),
        }
        m["files"][graph.name] = {"sha256": sha256_file(graph), "bytes": graph.stat().st_size}
        write_json_atomic(new / "manifest.json", m)
        write_query_sample(new, corpus[:SAMPLE], f"{min(SAMPLE, len(corpus))} of the distillation texts")
        Bundle.open(new)  # every checksum
        new.rename(out)  # last: until here there is no bundle at `out`
    log(f"{out}: text tower of {len(layers)} layers ({', '.join(map(str, layers))} of the teacher)")
    return m["text"]["distilled"]


def _gates(student, fp32, graph, portable, teacher_fns, student_fns, ds, bundle, tok) -> dict[str, Any]:
    texts = [e.text for e in sorted(ds.split_expressions("test"), key=lambda e: e.id)]
    ids, mask, _ = tok(texts)
    with torch.no_grad():
        ref = student.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).numpy()
    onnx32 = TextEncoder(fp32, tok)(texts)
    rel = float(np.abs(onnx32 - ref).max() / np.abs(ref).max())
    shipped = student_fns[1](texts)
    teacher_q = teacher_fns[1](texts)
    gates = [G.Gate("text query max|d| / max|q| vs PyTorch", rel, 1e-4, rel <= 1e-4)]
    if portable == "w16":
        cos = float(_cos(shipped, onnx32).min())
        gates.append(G.Gate("text query min cosine, w16 vs fp32", cos, 0.999, cos >= 0.999))
    mean = float(_cos(shipped, teacher_q).mean())
    gates.append(G.Gate("text query mean cosine vs teacher", mean, COSINE_LIMIT, mean >= COSINE_LIMIT))
    t_metrics = G.retrieval(teacher_fns, ds, bundle.input_hw)
    s_metrics = G.retrieval(student_fns, ds, bundle.input_hw)
    for key in GATED:
        d = abs(t_metrics[key] - s_metrics[key])
        gates.append(G.Gate(f"|d {key}| points vs teacher", d, ACCURACY_LIMIT, d <= ACCURACY_LIMIT))
    return {"gates": gates, "teacher": t_metrics, "student": s_metrics}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
