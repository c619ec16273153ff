"""How well do both halves of neighbour naming read their facts?
`python -m reir.training.probes.neighbours CKPT` (a checkpoint trained with `loss.neighbour_weight`).

Visual half: for every ground-truth object of the first test images, the query with the
highest IoU (>= 0.5) is read through the last layer's readout (`neighbours.py`) and compared
with the scene's exact facts: mean per-fact AUC, and the BCE against per-fact base rates.
Text half: for the split's relation texts, the mean probability the readout gives the facts a
text asks against the others. Ranking across a gallery needs near-certain facts: a relation
query's answer must beat every look-alike on two or three facts at once
(benchmarks/results/synth-history.md, "Session 10").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from reir.datasets import DataError, load_dataset
from reir.datasets.synth import SceneObject
from reir.engine.runtime.image import load_rgb

from ..box_ops import box_iou, cxcywh_to_xyxy
from ..checkpoint import CheckpointError, load_checkpoint, model_from_state
from ..evaluate import torch_text_encoder
from ..neighbours import asked_facts, scene_facts
from ..text_branch import load_tokenizer
from .context import probe_args


def fact_auc(p: np.ndarray, y: np.ndarray, min_each: int = 5) -> float:
    """Mean over facts (columns) of the AUC of p for y, where a fact has at least `min_each`
    positives and negatives; ties count half."""
    aucs = []
    for f in range(y.shape[1]):
        pos, neg = p[y[:, f] == 1, f], p[y[:, f] == 0, f]
        if len(pos) >= min_each and len(neg) >= min_each:
            aucs.append(float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()))
    return float(np.mean(aucs)) if aucs else float("nan")


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = p.clip(1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


@torch.no_grad()
def probe(checkpoint: Path, data: Path, split: str, images: int, min_iou: float = 0.5) -> dict[str, float]:
    cfg, state = load_checkpoint(checkpoint)
    key, criterion = f"neighbours.{cfg.model.dec_layers - 1}.read", state.get("criterion", {})
    if f"{key}.weight" not in criterion:
        raise CheckpointError(f"{checkpoint}: trained without neighbour naming (loss.neighbour_weight is 0)")
    w, b = criterion[f"{key}.weight"], criterion[f"{key}.bias"]
    model = model_from_state(checkpoint, cfg, state)
    ds = load_dataset(data)
    by_image, size = ds.instances_by_image(), cfg.model.image_size
    probs, labels = [], []
    for image_id in ds.gallery_image_ids(split)[:images]:
        meta, objs = ds.images[image_id], sorted(by_image[image_id], key=lambda x: x.id)
        arr = load_rgb(ds.image_path(image_id), size)
        if arr is None or not objs or not all(o.attributes for o in objs):
            continue
        out = model.encode_image(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255.0)
        scale = torch.tensor([meta.width, meta.height, meta.width, meta.height], dtype=torch.float32)
        gt = torch.tensor([o.box for o in objs], dtype=torch.float32) / scale
        iou = box_iou(cxcywh_to_xyxy(out["boxes"][-1][0]), gt)[0]
        facts = scene_facts([SceneObject(**o.attributes, box=o.box) for o in objs], meta.width, meta.height)
        read = torch.sigmoid(out["neighbours"][-1][0] @ w.T + b).numpy()
        for n in range(len(objs)):
            q = int(iou[:, n].argmax())
            if float(iou[q, n]) >= min_iou:
                probs.append(read[q])
                labels.append(facts[n])
    if not probs:
        raise SystemExit(f"{data}: no {split} object with scene attributes was found by the model")
    p, y = np.array(probs), np.array(labels)
    exprs = [e for e in ds.split_expressions(split) if asked_facts(e.logic) is not None][:1000]
    q = torch.from_numpy(torch_text_encoder(model, load_tokenizer(cfg.model.text))([e.text for e in exprs]))
    tp, ty = torch.sigmoid(q @ w.T + b).numpy(), np.stack([asked_facts(e.logic) for e in exprs])
    return {
        "objects": len(y),
        "visual AUC": fact_auc(p, y),
        "visual BCE": _bce(p, y),
        "base-rate BCE": _bce(np.broadcast_to(y.mean(0), y.shape), y),
        "relation texts": len(exprs),
        "text p(asked)": float((tp * ty).sum() / ty.sum()),
        "text p(other)": float((tp * (1 - ty)).sum() / (1 - ty).sum()),
    }


def main(argv: list[str] | None = None) -> None:
    args = probe_args(__doc__, 128, argv)
    try:
        found = probe(args.checkpoint, args.data, args.split, args.images)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"neighbour_probe: {e}") from None
    print(f"{args.checkpoint}: neighbour facts, {args.split} split")
    for name, value in found.items():
        print(f"  {name:15s} {value:10.4f}" if isinstance(value, float) else f"  {name:15s} {value:10d}")


if __name__ == "__main__":
    main()
