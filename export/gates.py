"""Accuracy gates: an exported graph ships only if it answers like its reference.

The probe set is our own synthetic benchmark, generated fresh at export time from a fixed
seed (300 gallery images, every expression with its exact answer set). Each gate is a
number, a limit and a verdict; a failed gate stops the export and prints all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from reir.datasets import Dataset
from reir.datasets.synth import SynthConfig, generate
from reir.engine.errors import ReirError
from reir.engine.runtime.image import read_rgb, resize_rgb
from reir.evaluation import pairwise_iou
from reir.evaluation.protocol import DetectFn, EncodeTextFn, evaluate_retrieval

PROBE_SEED = 61  # a seed no recipe trains on
PARITY_IMAGES = 32
PARITY_TEXTS = 128
KS = (1, 5, 10)


@dataclass
class Gate:
    name: str
    value: float
    limit: float
    passed: bool


class GateError(ReirError):
    def __init__(self, stage: str, gates: list[Gate]):
        self.gates = gates
        super().__init__(f"export refused: {stage} failed its accuracy gates\n{format_gates(gates)}")


def format_gates(gates: list[Gate]) -> str:
    rows = [f"  {'PASS' if g.passed else 'FAIL'}  {g.name:<44} {g.value:>12.6g}  (limit {g.limit:g})" for g in gates]
    return "\n".join(rows)


def probe_set(work: Path, images: int = 300) -> Dataset:
    ds, _ = generate(work / "probe", SynthConfig(images=images, seed=PROBE_SEED, fractions=(0, 0, 1)), progress=False)
    return ds


def parity(
    ref: tuple[DetectFn, EncodeTextFn],
    cand: tuple[DetectFn, EncodeTextFn],
    ds: Dataset,
    input_hw: tuple[int, int],
    tie_routings: tuple[EncodeTextFn, ...] = (),
    tie_proposals: Callable[[np.ndarray], list[tuple]] | None = None,
) -> dict[str, float]:
    """Embedding and box agreement of `cand` with `ref` on the first probe images and texts.

    `tie_routings`: the reference's queries under each other MORE routing, where it ties with
    its own; `tie_proposals`: of images, the reference's detections under each exchange of two
    tied proposal ranks (export/ties.py). A text or an instance is compared with the choice
    that explains it, and the flips are counted."""
    ids = ds.gallery_image_ids("test")[:PARITY_IMAGES]
    images = np.stack([resize_rgb(read_rgb(ds.image_path(i)), *input_hw) for i in ids])
    texts = [e.text for e in sorted(ds.split_expressions("test"), key=lambda e: e.id)][:PARITY_TEXTS]
    rb, _, re_, rn = ref[0](images)
    cb, _, ce, cn = cand[0](images)
    q_ref, q_cand = ref[1](texts), cand[1](texts)
    q_rel, q_cos = _agreement(q_ref, q_cand)
    q_flipped = np.zeros(len(texts), bool)
    for routing in tie_routings:
        q_alt = routing(texts)
        at_tie = _agreement(q_ref, q_alt)[1] < 1 - 1e-6  # elsewhere the routing is the text's own
        q_rel, q_cos, took = _explained(q_rel, q_cos, *_agreement(q_alt, q_cand), at_tie)
        q_flipped |= took
    alternatives = tie_proposals(images) if tie_proposals else []
    min_iou, counts_equal, total = 1.0, True, 0
    rel, cos, flipped = [np.zeros(0)], [np.zeros(0)], [np.zeros(0, bool)]
    for b in range(len(images)):
        n, m = int(rn[b]), int(cn[b])
        counts_equal &= n == m
        total += n
        if n == 0 or m == 0:
            min_iou = min(min_iou, 1.0 if n == m else 0.0)
            continue
        iou = pairwise_iou(rb[b, :n].astype(np.float64), cb[b, :m].astype(np.float64))
        min_iou = min(min_iou, float(iou.max(1).min()))
        i, j = _same_instances(iou)
        r, c = _agreement(re_[b, i], ce[b, j])
        took = np.zeros(len(j), bool)
        for ab, _, ae, an in alternatives:
            k = int(an[b])
            if k == 0:
                continue
            alt_iou = pairwise_iou(ab[b, :k].astype(np.float64), cb[b, :m].astype(np.float64))
            ai, aj = _same_instances(alt_iou)
            at = np.full(m, -1)
            at[aj] = ai  # the alternative's instance for each candidate one, where there is one
            has = at[j] >= 0
            a_rel, a_cos = np.ones(len(j)), np.full(len(j), -1.0)
            a_rel[has], a_cos[has] = _agreement(ae[b, at[j][has]], ce[b, j[has]])
            r, c, t = _explained(r, c, a_rel, a_cos, has)
            took |= t
        rel.append(r)
        cos.append(c)
        flipped.append(took)
    rel_all, cos_all, flipped_all = np.concatenate(rel), np.concatenate(cos), np.concatenate(flipped)
    return {
        "query_max_rel_err": float(q_rel.max()),
        "query_min_cos": float(q_cos.min()),
        "query_routing_flips": float(q_flipped.mean()) if len(texts) else 0.0,
        "instance_max_rel_err": float(rel_all.max()) if len(rel_all) else 0.0,
        "instance_mean_cos": float(cos_all.mean()) if len(cos_all) else 1.0,
        "instance_min_cos": float(cos_all.min()) if len(cos_all) else 1.0,
        "instance_proposal_flips": float(flipped_all.mean()) if len(flipped_all) else 0.0,
        "box_min_iou": min_iou,
        "instances_matched": len(cos_all) / max(total, 1),
        "num_detections_equal": float(counts_equal),
    }


def _same_instances(iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (reference row, candidate column) that are the same instance: box IoU >= 0.99 and
    each the other's best match. Where the two graphs' NMS kept different queries for one
    object, the pair is left out (`instances_matched` counts them)."""
    best = iou.argmax(1)
    same = (iou.max(1) >= 0.99) & (iou.argmax(0)[best] == np.arange(iou.shape[0]))
    return np.nonzero(same)[0], best[same]


def _explained(
    rel: np.ndarray, cos: np.ndarray, alt_rel: np.ndarray, alt_cos: np.ndarray, at_tie: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the candidate took the alternative choice (at a tie, the alternative explains it
    at least twice as well, and the gap to the own choice is real), compare it with that."""
    took = at_tie & (1 - alt_cos < 0.5 * (1 - cos)) & (cos < 1 - 1e-4)
    return np.where(took, alt_rel, rel), np.where(took, alt_cos, cos), took


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: max |a - b| / |a| and cosine."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return np.abs(a - b).max(1) / np.maximum(na, 1e-12), (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def retrieval(fns: tuple[DetectFn, EncodeTextFn], ds: Dataset, input_hw: tuple[int, int]) -> dict[str, float]:
    report = evaluate_retrieval(fns[0], fns[1], ds, "test", input_hw, progress=False)
    keys = [f"{p}BR@{k}(0.5)" for p in ("", "m") for k in KS] + ["REC@0.5"]
    return {k: round(report.metrics[k], 4) for k in keys}


def gate_fp32(par: dict[str, float], ref: dict[str, float], cand: dict[str, float]) -> list[Gate]:
    gates = [
        Gate("text query max|d|/|q| vs PyTorch", par["query_max_rel_err"], 1e-4, par["query_max_rel_err"] <= 1e-4),
        Gate("instance max|d|/|o| vs PyTorch", par["instance_max_rel_err"], 1e-4, par["instance_max_rel_err"] <= 1e-4),
        Gate("kept boxes min IoU vs PyTorch", par["box_min_iou"], 0.99, par["box_min_iou"] >= 0.99),
        Gate("kept box counts equal", par["num_detections_equal"], 1, par["num_detections_equal"] == 1),
    ]
    for key in ref:
        if "BR@" in key:
            d = abs(ref[key] - cand[key])
            gates.append(Gate(f"|d {key}| points vs PyTorch", d, 0.5, d <= 0.5))
    return gates


def gate_reduced(precision: str, par: dict[str, float], ref: dict[str, float], cand: dict[str, float]) -> list[Gate]:
    """fp32 (a trimmed vocabulary, which should change nothing): cosine >= 0.9999, BR@1 within 0.5
    point; fp16 and w16 (the same fp16 rounding of the weights): cosine >= 0.999, within 1;
    int8: cosine >= 0.99, within 2.

    Text queries: the minimum cosine, each to the fp32 query under the MORE routing it took
    where that routing ties with the fp32 one. Instances: the mean over the same instance in
    both graphs, each to the fp32 instance under the proposal ranking it took where two ranks
    tie (export/ties.py). The share of flips is recorded: how often depends on how decisive the
    trained model is, and their effect on retrieval the BR gates measure. The instance minimum
    is recorded, not gated: NMS may keep another of two near-identical queries on an object."""
    cos_limit, br_limit = {"fp32": (0.9999, 0.5), "w16": (0.999, 1.0), "fp16": (0.999, 1.0), "int8": (0.99, 2.0)}[
        precision
    ]
    gates = [
        Gate("text query min cosine vs fp32", par["query_min_cos"], cos_limit, par["query_min_cos"] >= cos_limit),
        Gate(
            "instance mean cosine vs fp32", par["instance_mean_cos"], cos_limit, par["instance_mean_cos"] >= cos_limit
        ),
    ]
    for key in ("BR@1(0.5)", "mBR@1(0.5)"):
        d = abs(ref[key] - cand[key])
        gates.append(Gate(f"|d {key}| points vs fp32", d, br_limit, d <= br_limit))
    return gates


def as_records(gates: list[Gate]) -> list[dict]:
    return [asdict(g) for g in gates]
