"""`reir eval`: the report of a checkpoint (PyTorch) or of a bundle (through a real gallery)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint (PyTorch) or a bundle (the engine) on a dataset")
    p.add_argument("checkpoint", type=Path, nargs="?", help="a training checkpoint; or pass --bundle")
    p.add_argument("--bundle", type=Path, help="evaluate an exported bundle through the engine (no torch)")
    p.add_argument("--data", type=Path, required=True, help="canonical dataset directory")
    p.add_argument("--split", default="test")
    p.add_argument("--gallery-images", type=int, default=0, help="first N gallery images only (0 = all)")
    p.add_argument("--device", default="auto", help="PyTorch checkpoints: auto (GPU if torch sees one), cpu or cuda")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--md", type=Path, help="write the report as a markdown table")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.bundle is None):
        raise UsageError("reir eval: pass a CHECKPOINT (PyTorch) or --bundle BUNDLE (the engine), not both")
    report = _bundle(args) if args.bundle else _checkpoint(args)
    report.write(args.json, args.md)
    return 0


def _checkpoint(args: argparse.Namespace):
    # torch: only for a checkpoint; a bundle is scored with no torch installed
    from reir.datasets import load_dataset
    from reir.training.checkpoint import load_model  # torch: only for a checkpoint
    from reir.training.evaluate import evaluate_model
    from reir.training.text_branch import load_tokenizer
    from reir.training.trainer import resolve_device

    cfg, model = load_model(args.checkpoint)
    model.to(resolve_device(args.device, "--device"))
    if args.gallery_images:
        cfg.eval.gallery_images = args.gallery_images
    ds = load_dataset(args.data)
    report = evaluate_model(model, load_tokenizer(cfg.model.text), ds, args.split, cfg.eval, not args.quiet)
    report.meta["checkpoint"] = str(Path(args.checkpoint))
    print(report.table())
    return report


def _bundle(args: argparse.Namespace):
    """The same report through the engine's ONNX graphs and a real gallery's search."""
    from reir.datasets import load_dataset
    from reir.engine.runtime.bundle import Bundle
    from reir.evaluation.gallery_ranker import GalleryRanker
    from reir.evaluation.protocol import evaluate_retrieval

    bundle = Bundle.open(args.bundle)
    ds = load_dataset(args.data)
    with tempfile.TemporaryDirectory(prefix="reir-eval-") as tmp:
        ranker = GalleryRanker(Path(tmp) / "gallery", bundle, progress=not args.quiet)
        report = evaluate_retrieval(
            bundle.visual_encoder(),
            bundle.text_encoder(),
            ds,
            args.split,
            bundle.input_hw,
            gallery_images=args.gallery_images,
            progress=not args.quiet,
            rank=ranker,
        )
        index = ranker.describe()
    m = bundle.manifest
    report.meta.update(
        {
            "bundle": str(args.bundle),
            "protocol": f"engine: NMS {m['nms_iou']:.2f}, top-{m['topk']}",
            "search": f"the gallery's search ({index['kind']}, {index['rows']} instances)",
        }
    )
    print(report.table())
    exact = report.meta["exact_protocol"]
    keys = [k for k in ("mBR@1(0.5)", "mBR@5(0.5)", "mBR@10(0.5)", "BR@1(0.5)") if k in exact]
    print("through the gallery's search vs the exact protocol (every instance scored in memory):")
    print("  " + ", ".join(f"{k} {report.metrics[k]:.2f} vs {exact[k]:.2f}" for k in keys))
    return report
