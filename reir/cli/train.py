"""`reir train CONFIG`: CLARE from a YAML recipe (needs the `train` extra: torch)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train CLARE from a YAML recipe (configs/*.yaml)")
    p.add_argument("config", type=Path)
    p.add_argument("--resume", action="store_true", help="continue the run's last checkpoint, same schedule")
    p.add_argument(
        "--start-from",
        type=Path,
        metavar="CKPT",
        help="weights of a finished stage (e.g. runs/synth/grounding.pt), then the recipe's later stages",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.batch_size=8")
    p.add_argument("--eval", action="store_true", help="evaluate the final checkpoint on the recipe's eval split")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # torch and the model: imported when a training command runs, never by a serving host
    from reir.training.config import load_config, parse_overrides
    from reir.training.evaluate import evaluate_model
    from reir.training.trainer import Trainer

    cfg = load_config(args.config, parse_overrides(args.set))
    trainer = Trainer(cfg, progress=not args.quiet)
    final = trainer.fit(resume=args.resume, start_from=args.start_from)
    if trainer.rank == 0:
        print(f"wrote {final}")
    if args.eval and trainer.rank == 0:
        report = evaluate_model(trainer.model, trainer.tokenizer, trainer.ds, cfg.eval.split, cfg.eval, not args.quiet)
        print(report.table())
        report.write(final.with_suffix(".eval.json"))
    return 0
