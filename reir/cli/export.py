"""`reir export CHECKPOINT | trt BUNDLE | triton BUNDLE | queries BUNDLE`: deployable artifacts."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from reir.engine.bundle import BundleError
from reir.engine.fsutil import OutputExistsError
from reir.export.query_sample import expressions, write_query_sample
from reir.export.tensorrt import TensorRTUnavailable, build_engines
from reir.export.triton import write_repository


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to a gated ONNX bundle; `reir export trt BUNDLE` builds TensorRT engines",
        description="reir export CHECKPOINT --out BUNDLE [...]  |  reir export trt BUNDLE [...]",
    )
    p.add_argument("source", help="a checkpoint (.pt), or 'trt' / 'triton' / 'queries' followed by a bundle")
    p.add_argument("bundle", nargs="?", type=Path, help="with 'trt', 'triton' or 'queries': the bundle directory")
    p.add_argument("--data", type=Path, help="queries: a dataset whose --split expressions make the query sample")
    p.add_argument("--split", default="train", help="queries: the split to draw expressions from")
    p.add_argument("--texts", type=Path, help="queries: a text file, one expression per line (e.g. a query log)")
    p.add_argument("--samples", type=int, default=4096, help="queries: how many expressions to encode")
    p.add_argument("--gallery", type=Path, help="triton: the gallery `retrieve` serves (its parent = the gallery root)")
    p.add_argument("--out", type=Path, help="bundle directory to write (atomically)")
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "w16", "int8"],
        default=None,
        help="default fp32 (trt: fp16); w16 = fp16 weights, fp32 compute (half the size, for CPU)",
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
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
    p.add_argument("--workspace", type=float, default=4.0, help="trt: builder workspace, GiB")
    p.add_argument("--timing-cache", type=Path, help="trt: timing cache file (read and updated)")
    p.add_argument("--opt-batch", type=int, default=8, help="trt: batch size the kernels are tuned for")
    p.set_defaults(handler=run)


def parse_hw(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 32 or int(m.group(2)) < 32:
        raise ValueError(f"--static-shape: expected HxW with both sides >= 32 (e.g. 128x128), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run(args: argparse.Namespace) -> int:
    errors: tuple = (ValueError, BundleError, OutputExistsError, TensorRTUnavailable)
    try:
        if args.source == "trt":
            return _trt(args)
        if args.source == "triton":
            return _triton(args)
        if args.source == "queries":
            return _queries(args)
        from reir.export.gates import GateError  # torch and onnx: only to export a checkpoint
        from reir.training.checkpoint import CheckpointError

        errors += (CheckpointError, GateError)
        return _export(args)
    except errors as e:
        print(f"reir: error: {e}", file=sys.stderr)
        return 2


def _queries(args: argparse.Namespace) -> int:
    if args.bundle is None or (args.data is None) == (args.texts is None):
        raise ValueError("usage: reir export queries BUNDLE (--data DATASET [--split S] | --texts FILE) [--samples N]")
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


def _export(args: argparse.Namespace) -> int:
    from reir.export.write_bundle import export_bundle  # torch and onnx: only for this command

    if args.bundle is not None:
        raise ValueError(f"unexpected argument {args.bundle} (did you mean --out {args.bundle}?)")
    if args.out is None:
        raise ValueError("--out BUNDLE is required")
    if args.max_batch < 1 or args.topk < 1 or not 0 < args.nms_iou <= 1:
        raise ValueError("--max-batch and --topk must be >= 1 and --nms-iou in (0, 1]")
    if args.vocab is not None and args.vocab < 1000:
        raise ValueError(f"--vocab {args.vocab}: keep at least the first 1000 ids (special tokens and characters)")
    export_bundle(
        Path(args.source),
        args.out,
        precision=args.precision or "fp32",
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
    if args.bundle is None:
        raise ValueError("usage: reir export trt BUNDLE [--precision fp16] [--workspace GiB] [--timing-cache FILE]")
    plans = build_engines(args.bundle, args.precision or "fp16", args.workspace, args.timing_cache, args.opt_batch)
    for p in plans:
        print(f"wrote {p} (+ {p.name}.json)")
    return 0


def _triton(args: argparse.Namespace) -> int:
    from reir.export.triton_validate import validate_repository  # protobuf from tritonclient

    if args.bundle is None or args.out is None or args.gallery is None:
        raise ValueError("usage: reir export triton BUNDLE --out REPO --gallery GALLERY")
    repo = write_repository(args.bundle, args.out, args.gallery.parent, args.gallery.name, args.overwrite)
    problems = validate_repository(repo)
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    print(f"wrote {repo}" + (f" with {len(problems)} problem(s)" if problems else " (validated)"))
    return 1 if problems else 0
