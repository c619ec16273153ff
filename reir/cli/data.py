"""`reir synth` and `reir data validate|stats|convert|show`: datasets, no model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UsageError


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="dataset: canonical dir, RefCOCO dir, or UNINEXT .json")
    p.add_argument("--format", choices=["canonical", "refcoco", "uninext"], help="default: detected")
    p.add_argument("--split-by", help="RefCOCO: which refs(<split_by>).p to read (unc, google, umd)")
    p.add_argument("--images", type=Path, help="image directory (RefCOCO/UNINEXT; default PATH/images)")
    p.add_argument("--split", help="UNINEXT: split name of the file (default: from its name)")


def register(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic REIR benchmark")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--splits", default="0.7,0.1,0.2", help="train,val,test fractions of the images")
    p.add_argument("--exprs-per-image", type=int, default=2)
    p.add_argument("--answers", choices=["eval", "all", "none"], default="eval", help="splits with exact answer sets")
    p.add_argument(
        "--answer-sample",
        type=int,
        default=0,
        metavar="N",
        help="give exact answer sets to only N drawn expressions per split (for galleries of 100k+ images)",
    )
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p.set_defaults(handler=cmd_synth)

    data = sub.add_parser("data", help="inspect, validate and convert datasets").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("validate", help="check every record; exit 1 if any is bad")
    _data_args(p)
    p.set_defaults(handler=_validate)
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records, print how many of each kind")
    p.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    p.add_argument("--max-errors", type=int, default=20, help="problems to print (all are counted)")
    p = data.add_parser("stats", help="counts, splits, expression types, specificity")
    _data_args(p)
    p.set_defaults(handler=_stats)
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--json", action="store_true")
    p = data.add_parser("convert", help="convert RefCOCO / UNINEXT data to the canonical format")
    _data_args(p)
    p.set_defaults(handler=_convert)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--skip-invalid", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p = data.add_parser("show", help="draw an expression's image with its target box")
    _data_args(p)
    p.set_defaults(handler=_show)
    p.add_argument("--expr", type=int, required=True, help="expression id")
    p.add_argument("-o", "--output", type=Path, required=True)


def _load(args: argparse.Namespace, skip_invalid: bool = False, check_files: bool = True):
    from reir.datasets import drop_invalid, load_dataset, validate

    ds = load_dataset(args.path, args.format, split_by=args.split_by, images=args.images, split=args.split)
    problems = validate(ds, check_files=check_files)
    if skip_invalid and problems:
        ds, dropped = drop_invalid(ds, problems)
        summary = ", ".join(f"{k} {n}" for k, n in sorted(dropped.items()))
        print(f"skipped {sum(dropped.values())} invalid record(s): {summary}", file=sys.stderr)
        problems = []
    return ds, problems


def cmd_synth(args: argparse.Namespace) -> int:
    from reir.datasets.stats import dataset_stats, format_stats
    from reir.datasets.synth import SynthConfig, generate

    try:
        fractions = tuple(float(x) for x in args.splits.split(","))
    except ValueError:
        raise UsageError(f"--splits: expected three comma-separated fractions, got {args.splits!r}") from None
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise UsageError(f"--splits: three non-negative fractions summing to 1, got {args.splits!r}")
    if args.images < 1 or args.size < 32:
        raise UsageError("--images must be >= 1 and --size >= 32")
    if args.answer_sample < 0:
        raise UsageError("--answer-sample must be >= 0 (0: every expression)")
    cfg = SynthConfig(
        images=args.images,
        seed=args.seed,
        size=args.size,
        fractions=fractions,
        exprs_per_image=args.exprs_per_image,
        answers=args.answers,
        answer_sample=args.answer_sample,
        workers=args.workers,
    )
    ds, speed = generate(args.out, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(format_stats(dataset_stats(ds)))
    print(f"\nwrote {args.out} ({speed:.0f} images/s with {args.workers} worker(s))")
    return 0


def _validate(args: argparse.Namespace) -> int:
    ds, problems = _load(args, skip_invalid=args.skip_invalid, check_files=not args.no_check_files)
    if problems:
        for p in problems[: args.max_errors]:
            print(p, file=sys.stderr)
        if len(problems) > args.max_errors:
            print(f"... and {len(problems) - args.max_errors} more", file=sys.stderr)
        kinds: dict[str, int] = {}
        for p in problems:
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
        summary = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        print(f"{args.path}: {len(problems)} problem(s): {summary}", file=sys.stderr)
        return 1
    c = ds.counts()
    print(f"{args.path}: OK ({c['images']} images, {c['instances']} instances, {c['expressions']} expressions)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from reir.datasets.stats import dataset_stats, format_stats

    ds, problems = _load(args, skip_invalid=args.skip_invalid, check_files=False)
    st = dataset_stats(ds)
    print(json.dumps(st, indent=2) if args.json else format_stats(st))
    if problems:
        print(f"note: {len(problems)} invalid record(s); run `reir data validate`", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from reir.datasets.show import render_expression

    ds, _ = _load(args, check_files=False)
    img = render_expression(ds, args.expr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.output)
    print(f"wrote {args.output}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from reir.datasets import write_canonical
    from reir.engine.fsutil import atomic_directory

    ds, problems = _load(args, skip_invalid=args.skip_invalid, check_files=True)
    if problems:
        for p in problems[:20]:
            print(p, file=sys.stderr)
        raise UsageError(f"{args.path}: {len(problems)} invalid record(s); fix them or pass --skip-invalid")
    ds.meta = {**ds.meta, "converted_from": str(args.path.resolve())}
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        write_canonical(ds, tmp, image_root=str(ds.image_root.resolve()))
    c = ds.counts()
    print(f"wrote {args.out}: {c['images']} images, {c['instances']} instances, {c['expressions']} expressions")
    return 0
