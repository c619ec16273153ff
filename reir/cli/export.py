"""`reir export bundle|trt|queries`: deployable artifacts.

reir export bundle CHECKPOINT --out BUNDLE [...]    a gated ONNX bundle (torch, onnx)
reir export trt BUNDLE [...]                       TensorRT engines, on the GPU host
reir export cpu-text BUNDLE                        an int8 text encoder for CPU hosts (gated)
reir export distill-text BUNDLE --out NEW          a bundle with a shallower text tower, taught by its own (gated)
reir export queries BUNDLE (--data D | --texts F)  the query sample a gallery fits its index to
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def register(sub) -> None:
    e = sub.add_parser("export", help="deployable artifacts: a gated ONNX bundle, TensorRT engines, a query sample")
    x = e.add_subparsers(dest="export_command", required=True)

    p = x.add_parser("bundle", help="export a checkpoint to a gated ONNX bundle")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write (atomically)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "w16", "int8"],
        default="fp32",
        help="w16 = fp16 weights, fp32 compute (half the size, for CPU)",
    )
    p.add_argument(
        "--vocab",
        type=int,
        metavar="N",
        help="trim the text vocabulary to its N most frequent tokens + the synthetic grammar's (gated)",
    )
    p.add_argument("--static-shape", metavar="HxW", help="fixed-shape graphs (Jetson/DLA): batch = --max-batch")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--topk", type=int, default=30, help="instances kept per image after NMS")
    p.add_argument("--nms-iou", type=float, default=0.7)
    p.add_argument("--probe-images", type=int, default=300, help="synthetic gallery size for the accuracy gates")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--no-optimized-copy", action="store_true", help="skip the ORT-optimised copies (smaller bundle, slower start)"
    )
    p.set_defaults(handler=_bundle)

    p = x.add_parser("trt", help="build TensorRT engines for a bundle (on the GPU host: TensorRT 10 or 11)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16")
    p.add_argument("--workspace", type=float, default=4.0, help="builder workspace, GiB")
    p.add_argument("--timing-cache", type=Path, help="timing cache file (read and updated)")
    p.add_argument("--opt-batch", type=int, default=8, help="batch size the kernels are tuned for")
    p.set_defaults(handler=_trt)

    p = x.add_parser("cpu-text", help="add an int8 text encoder for CPU hosts to a bundle (gated against its own)")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--keep", type=int, default=None, help="how many of the most sensitive products stay fp32 (default: a sixth)"
    )
    p.add_argument("--probe-images", type=int, default=300, help="synthetic gallery size for the accuracy gates")
    p.set_defaults(handler=_cpu_text)

    p = x.add_parser("distill-text", help="write a bundle whose text tower is a shallower student of this one's")
    p.add_argument("bundle", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the new bundle (must not exist)")
    p.add_argument("--layers", default="0,5", help="the teacher's text layers the student keeps (default: 0,5)")
    p.add_argument("--steps", type=int, default=2500, help="training steps of 128 texts (default: 2500)")
    p.add_argument("--texts", type=int, default=40_000, help="distinct train expressions to learn from")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="a dataset whose train split gives them (default: the synthetic grammar)",
    )
    p.add_argument("--probe-images", type=int, default=1000, help="synthetic gallery size for the accuracy gates")
    p.set_defaults(handler=_distill_text)

    p = x.add_parser("queries", help="write a bundle's query sample from a dataset split or a query log")
    p.add_argument("bundle", type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a dataset whose --split expressions make the query sample")
    src.add_argument("--texts", type=Path, help="a text file, one expression per line (e.g. a query log)")
    p.add_argument("--split", default="train", help="with --data: the split to draw expressions from")
    p.add_argument("--samples", type=int, default=4096, help="how many expressions to encode")
    p.set_defaults(handler=_queries)


def parse_hw(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 32 or int(m.group(2)) < 32:
        raise ValueError(f"--static-shape: expected HxW with both sides >= 32 (e.g. 128x128), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _bundle(args: argparse.Namespace) -> int:
    from reir.export.write_bundle import export_bundle  # torch and onnx: only for this command

    if args.max_batch < 1 or args.topk < 1 or not 0 < args.nms_iou <= 1:
        raise ValueError("--max-batch and --topk must be >= 1 and --nms-iou in (0, 1]")
    if args.vocab is not None and args.vocab < 1000:
        raise ValueError(f"--vocab {args.vocab}: keep at least the first 1000 ids (special tokens and characters)")
    export_bundle(
        args.checkpoint,
        args.out,
        precision=args.precision,
        static_shape=parse_hw(args.static_shape) if args.static_shape else None,
        max_batch=args.max_batch,
        topk=args.topk,
        nms_iou=args.nms_iou,
        probe_images=args.probe_images,
        overwrite=args.overwrite,
        optimized_copy=not args.no_optimized_copy,
        vocab=args.vocab,
    )
    return 0


def _trt(args: argparse.Namespace) -> int:
    from reir.export.tensorrt import build_engines

    plans = build_engines(args.bundle, args.precision, args.workspace, args.timing_cache, args.opt_batch)
    for p in plans:
        print(f"wrote {p} (+ {p.name}.json)")
    return 0


def _cpu_text(args: argparse.Namespace) -> int:
    from reir.export.cpu_text import add_cpu_text

    if args.keep is not None and args.keep < 0:
        raise ValueError(f"--keep must be 0 or more, got {args.keep}")
    add_cpu_text(args.bundle, args.probe_images, args.keep)
    return 0


def _distill_text(args: argparse.Namespace) -> int:
    from reir.export.distill_text import distill_bundle

    if not re.fullmatch(r"\d+(,\d+)*", args.layers):
        raise ValueError(f"--layers: comma-separated layer indices such as 0,5 (got {args.layers!r})")
    if args.steps < 1 or args.texts < 10:
        raise ValueError(f"--steps must be 1 or more and --texts 10 or more (got {args.steps}, {args.texts})")
    layers = tuple(int(x) for x in args.layers.split(","))
    distill_bundle(args.bundle, args.out, layers, args.steps, args.texts, args.data, args.probe_images)
    return 0


def _queries(args: argparse.Namespace) -> int:
    from reir.export.query_sample import expressions, write_query_sample

    if args.texts is not None:
        try:
            lines = [t.strip() for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{args.texts}: cannot read ({e})") from None
        texts, source = lines[: args.samples], f"{args.texts.name}: {min(len(lines), args.samples)} lines"
    else:
        texts = expressions(args.data, args.split, args.samples)
        source = f"{len(texts)} {args.split} expressions of {args.data.name}"
    entry = write_query_sample(args.bundle, texts, source)
    print(f"{args.bundle}: query sample of {entry['count']} vectors ({entry['source']})")
    return 0
