"""`reir`: one command line, one module per command group, each parser next to its handler.

    data.py     synth, data validate|stats|convert|show
    gallery.py  index, search, gallery info|check|rebuild|remove|sample
    eval.py     eval CHECKPOINT | --bundle BUNDLE
    train.py    train
    export.py   export CHECKPOINT | trt | triton | queries
    serve.py    serve, triton validate
    bench.py    bench report|micro|steps
    cluster.py  cluster index|serve (Ray)
    demo.py     demo

Modules import what every host has (numpy, Pillow, the engine) at the top; torch, onnx,
TensorRT, tritonclient and matplotlib load inside the handlers that need them, so a
serving host without the training extra runs every serving command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reir.datasets import DataError
from reir.engine.bundle import BundleError
from reir.engine.encoders import RuntimeUnavailable
from reir.engine.fsutil import OutputExistsError
from reir.engine.gallery import GalleryError
from reir.engine.image import ImageError
from reir.engine.serve_client import ServeError
from reir.engine.triton_client import TritonError
from reir.engine.triton_server import ServerError

from . import bench, cluster, data, demo, eval, export, gallery, serve, train
from .errors import UsageError

# what a user can fix: one line naming the file, record or field, exit code 2
USER_ERRORS = (
    ValueError,
    DataError,
    BundleError,
    GalleryError,
    ImageError,
    OutputExistsError,
    RuntimeUnavailable,
    TritonError,
    ServerError,
    ServeError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reir", description="Referring Expression Instance Retrieval (CLARE)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, train, eval, export, gallery, serve, cluster, bench, demo):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as e:
        print(f"reir: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reir: interrupted", file=sys.stderr)
        return 130


__all__ = ["UsageError", "build_parser", "main"]
