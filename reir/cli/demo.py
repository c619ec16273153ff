"""`reir demo`: the main job, end to end with the shipped model (reir/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job: generate, index and query a synthetic gallery")
    p.add_argument("--out", type=Path, default=Path("reir-demo"))
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", type=Path, help="default: the model shipped with the package")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reir.demo import run_demo

    return run_demo(args.out, images=args.images, seed=args.seed, bundle=args.bundle, threads=args.threads)
