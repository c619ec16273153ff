"""`reir`: one command line, one module per command group, each parser next to its handler.

    data.py     synth, data validate|stats|convert|show
    gallery.py  index, search, gallery info|check|rebuild|remove|sample
    eval.py     eval CHECKPOINT | --bundle BUNDLE
    train.py    train
    export.py   export bundle|trt|queries
    triton.py   triton export|validate|serve
    cluster.py  cluster index|serve (Ray)
    bench.py    bench report|micro|steps
    demo.py     demo
    common.py   what several of them share

Every module imports only argparse and the standard library at the top; each handler
imports what its command uses, so `reir search` loads no detector, no torch and no Ray.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reir.engine.errors import ReirError

from . import bench, cluster, data, demo, eval, export, gallery, train, triton
from .errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reir", description="Referring Expression Instance Retrieval (CLARE)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, train, eval, export, gallery, triton, cluster, bench, demo):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="reir: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        return args.handler(args)
    except (ValueError, ReirError) as e:  # what a user can fix: one line naming the file, record or field
        print(f"reir: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reir: interrupted", file=sys.stderr)
        return 130


__all__ = ["UsageError", "build_parser", "main"]
