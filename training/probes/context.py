"""Does the instance embedding use its context? `python -m reir.training.probes.context CKPT`.

The last decoder layer's instance embedding is the decoder state plus two added terms
(`context.py`): what lies around the instance and its own box. A term that hardly varies
from one object to the next cannot tell objects apart, whatever its size, so this reports,
over the confident objects of a few images, each part's spread: the RMS of its deviation
from its mean across objects. v8's context term spreads about 12 times less than the
decoder state: its gates had closed (benchmarks/results/synth-history.md, "Session 9").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from reir.datasets import DataError, load_dataset
from reir.engine.runtime.image import load_rgb

from ..checkpoint import CheckpointError, load_model
from ..model import CLARE
from ..transformer import pairwise_geometry


@torch.no_grad()
def context_spread(model: CLARE, images: torch.Tensor, min_objectness: float = 0.5) -> dict[str, float]:
    """images float [B, 3, S, S] in [0, 1] -> spread of 'state', 'context' and 'own box' across
    the objects scored above `min_objectness`, and the mean gate of the context slots."""
    if model.context is None:
        raise ValueError("this model has no instance-context heads (model.context_slots is 0)")
    head, seen = model.context[-1], {}

    def keep(module, args, output):  # the decoder's last layer: what the last context head reads
        hidden, boxes = output[0][-1], output[1][-1]
        objectness = model.objectness[-1](hidden).squeeze(-1)
        seen["state"], seen["objectness"] = hidden, objectness
        seen["context"], seen["own box"] = head.terms(hidden, boxes, objectness)
        seen["gates"] = torch.sigmoid(head.gate(_geometry(boxes)))

    handle = model.decoder.register_forward_hook(keep)
    try:
        model.eval().encode_image(images)
    finally:
        handle.remove()
    objects = torch.sigmoid(seen["objectness"]) > min_objectness
    if not bool(objects.any()):
        raise ValueError(f"no query scored above objectness {min_objectness}: is this a trained model?")
    out = {}
    for name in ("state", "context", "own box"):
        x = seen[name][objects]
        out[name] = float((x - x.mean(0)).pow(2).sum(-1).mean().sqrt())
    out["mean gate"] = float(seen["gates"].mean())
    return out


def _geometry(boxes: torch.Tensor) -> torch.Tensor:
    return pairwise_geometry(boxes.detach() * 4.0)


def probe_args(doc: str, images: int, argv: list[str] | None) -> argparse.Namespace:
    """The command line the probes share: CHECKPOINT, --data, --split, --images."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=Path("runs/data/synth"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--images", type=int, default=images)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = probe_args(__doc__, 64, argv)
    try:
        cfg, model = load_model(args.checkpoint)
        ds = load_dataset(args.data)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"context_probe: {e}") from None
    ids = ds.gallery_image_ids(args.split)[: args.images]
    size = cfg.model.image_size
    arrays = [a for a in (load_rgb(ds.image_path(i), size) for i in ids) if a is not None]
    if not arrays:
        raise SystemExit(f"{args.data}: none of the first {args.images} {args.split} images could be read")
    batch = np.stack(arrays)
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    spread = context_spread(model, images)
    print(f"{args.checkpoint}: spread across objects ({len(arrays)} {args.split} images, last decoder layer)")
    for name, value in spread.items():
        print(f"  {name:9s} {value:8.4f}")


if __name__ == "__main__":
    main()
