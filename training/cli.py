"""`reir train` and `reir eval` (imported only when those commands run: they need torch)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from .checkpoint import CheckpointError, load_model
from .config import ConfigError, load_config


def overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return _train(args) if args.command == "train" else _eval(args)
    except (ConfigError, CheckpointError) as e:
        print(f"reir: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_model
    from .trainer import Trainer

    cfg = load_config(args.config, overrides(args.set))
    trainer = Trainer(cfg, progress=not args.quiet)
    final = trainer.fit(resume=args.resume, start_from=args.start_from)
    if trainer.rank == 0:
        print(f"wrote {final}")
    if args.eval and trainer.rank == 0:
        report = evaluate_model(trainer.model, trainer.tokenizer, trainer.ds, cfg.eval.split, cfg.eval, not args.quiet)
        print(report.table())
        report.write(final.with_suffix(".eval.json"))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from reir.engine.data import load_dataset

    from .evaluate import evaluate_model
    from .text import load_tokenizer
    from .trainer import resolve_device

    if args.checkpoint is None:
        raise CheckpointError("reir eval: pass a CHECKPOINT (PyTorch) or --bundle BUNDLE (the engine)")
    cfg, model = load_model(args.checkpoint)
    model.to(resolve_device(args.device, "--device"))
    if args.gallery_images:
        cfg.eval.gallery_images = args.gallery_images
    ds = load_dataset(args.data)
    report = evaluate_model(model, load_tokenizer(cfg.model.text), ds, args.split, cfg.eval, not args.quiet)
    report.meta["checkpoint"] = str(Path(args.checkpoint))
    print(report.table())
    report.write(args.json, args.md)
    return 0
